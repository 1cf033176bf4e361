// AutoRec (Sedhain et al., WWW 2015) with a masked output: the reconstruction of a sparse row is computed only
// at the row's observed columns.
//
// A row r (an item's vector of user ratings for I-AutoRec, a user's vector of item ratings for U-AutoRec) is
// the CSR row X[r] over n_cols columns; x = its input values, t = the targets at the same entries.
//   H[r]     = act(X[r] W_enc + b_enc)                          W_enc (n_cols, hidden), b_enc (hidden,)
//   out[r,c] = H[r] . W_dec[c] + b_dec[c]  for c in the row's observed columns only
//                                                               W_dec (n_cols, hidden), b_dec (n_cols,)
// Loss of a batch of B rows (every row counts in B, an empty one too), T = the columns the batch touches:
//   L = (1/B) sum_{r, c observed} 0.5 (out[r,c] - t[r,c])^2 + (l2 / 2B) sum_{c in T} (|W_enc[c]|^2 + |W_dec[c]|^2)
// The L2 term covers the touched rows only ("lazy" weight decay): a step costs O(nnz x hidden) whatever
// n_cols. docs/DESIGN.md "AutoRec" says what this means against the paper's full-table L2.
// All arrays are row-major float32, caller-owned; training updates them in place.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"
#include "mlp.h"

namespace fastrec {

struct AutoRecModel {
  float* W_enc = nullptr;
  float* b_enc = nullptr;
  float* W_dec = nullptr;
  float* b_dec = nullptr;
  index_t n_cols = 0, hidden = 0;
  Activation act = Activation::Logistic;
};

// H (X.rows, hidden) = act(X W_enc + b_enc): the codes of the rows.
void autorec_hidden(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, float* H, int n_threads);

// out[q] for each query entry q of row r (q_indptr[r] <= q < q_indptr[r + 1], column q_cols[q]) =
// H[r] . W_dec[q_cols[q]] + b_dec[q_cols[q]]: the reconstruction of row r read at those columns.
void autorec_predict(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, const std::int64_t* q_indptr,
                     const std::int32_t* q_cols, float* out, int n_threads);

// L of X as one batch (X.data = x, t the targets); dense gradients of the four arrays (zero outside T).
double autorec_loss_and_gradients(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, const float* t,
                                  float l2, float* g_W_enc, float* g_b_enc, float* g_W_dec, float* g_b_dec,
                                  int n_threads);

// One epoch over the rows order[0:n_order] in batches of batch_size: each batch a step of opt (Adam: lazy rows,
// the global step count for the bias correction; Sgd: plain SGD p -= lr g, no state). opt.state1/state2 hold
// the optimizer state of W_enc, b_enc, W_dec, b_dec in that order (Adam only).
EpochResult autorec_train_epoch(const KernelSet& ks, const AutoRecModel& m, Optimizer& opt, const CsrView& X,
                                const float* t, const std::int64_t* order, index_t n_order, index_t batch_size,
                                float l2, const StopCheck& stop, int n_threads);

}  // namespace fastrec
