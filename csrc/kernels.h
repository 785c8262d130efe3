// The interface between the baseline module kdkernels._C (tensors, checks,
// GEMMs) and the per-ISA kernel modules kdkernels._kernels_<isa> (the loops).
//
// Each kernel module is built from csrc/kernels/*.cpp with its own ISA flags
// and exports one KernelTable (a PyCapsule named kKernelTableName); _C calls
// the loops only through the table that kdkernels/_cpu.py installed. Plain
// types only: no inline code here, so nothing compiled with one ISA's flags can
// be shared with code compiled for another (see README, "CPU kernels").
#pragma once

#include <cstdint>

namespace kdk {

inline constexpr const char* kKernelTableName = "kdkernels.kernel_table.v2";

enum class Dtype : int32_t { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };
enum class OfdMode : int32_t { kForward = 0, kNone = 1, kBackward = 2 };

// Pointers are to elements of `dtype` unless said otherwise; "acc" is the
// compute dtype (double for double, float otherwise).
struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512"

  // OFD over a dense tensor in memory order (see csrc/ofd.cpp); margin m is
  // acc [C]; returns the loss sum (kForward) or 0.
  double (*ofd)(OfdMode mode, bool grad_s, bool grad_t, Dtype dtype, const void* s, const void* t,
                const void* g, void* os, void* ot, const void* m, int64_t numel, int64_t C, int64_t stride_c,
                double scale2);

  // ND rows (see csrc/nd.cpp); row_weight and rows are acc.
  void (*nd)(Dtype dtype, const void* s, int64_t s_row, const void* t, int64_t t_row, const void* c,
             int64_t c_row, const int64_t* labels, const void* row_weight, double eps, int64_t B, int64_t D,
             void* rows, void* gs, int64_t gs_row, void* gt, int64_t gt_row);

  // LSH fused pass over one chunk of logits, Hs and Ht (acc, [B, nc]; no Ht
  // with codes); Hs becomes dh when grad_s.
  void (*lsh_chunk)(Dtype acc, bool use_codes, bool grad_s, void* Hs, const void* Ht, int64_t B, int64_t nc,
                    const uint8_t* codes, int64_t code_row, int64_t n0, const void* bias, const void* w,
                    double inv_n, double* bce_sum);
  // LSH last per-row pass: rows, the MSE term, the outputs' final form.
  // fs, ft, w, rows, gacc are acc; go_s, go_t are `dtype` with row strides.
  void (*lsh_rows)(Dtype dtype, const void* fs, const void* ft, const void* w, void* rows, const double* bce_sum,
                   double inv_n, double mse_weight, bool use_mse, const void* gacc, void* go_s, int64_t os_row,
                   void* go_t, int64_t ot_row, int64_t B, int64_t D);

  // SP per-row pass over the [b, b] Gram matrices (acc); das/dat may be null.
  void (*sp_rows)(Dtype acc, const void* as, const void* at, const void* w, int64_t b, bool l1, void* rows,
                  void* das, void* dat);
  // A = q q^T (acc [b, b], every element written) for q acc [b, K] with row
  // stride ld and unit inner stride (see csrc/kernels/gram.cpp).
  void (*gram)(Dtype acc, const void* q, int64_t ld, int64_t b, int64_t K, void* A);
};

}  // namespace kdk
