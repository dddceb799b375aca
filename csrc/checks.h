// Argument checks for the C++ entry points. Public Python functions validate user input with
// ValueErrors first; these guard the raw ops against misuse from torch.ops directly.
#pragma once
#include <torch/extension.h>

#define CLIPCID_CHECK(cond, ...) TORCH_CHECK((cond), "clipcid_fast: ", __VA_ARGS__)
#define CHECK_CPU(x) CLIPCID_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_CONTIGUOUS(x) CLIPCID_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, d) CLIPCID_CHECK((x).dim() == (d), #x " must have ", (d), " dims, got ", (x).dim())
#define CHECK_FLOAT_OR_BF16(x)                                                                  \
  CLIPCID_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16,          \
                #x " must be float32 or bfloat16, got ", (x).scalar_type())
#define CHECK_DTYPE(x, t) CLIPCID_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
#define CHECK_SAME_ROWS(a, b) \
  CLIPCID_CHECK((a).size(0) == (b).size(0), #a " and " #b " must have the same rows: ", (a).size(0), " vs ", (b).size(0))
