// Exact maximum-inner-product search: the k items with the largest dot product with each query, the
// product blocked on the micro-kernel and the selection fused into the pass over each block (no
// queries x items score matrix is ever stored).
#pragma once
#include <cstdint>

#include "common.h"
#include "kernels/kernels.h"

namespace fastrec {

// For each query q (row q of queries, ld_q floats apart, dim floats), the k items i with the largest
// score dot(queries[q], items[i]) among all n_items rows of `items` (row-major, ld_i floats apart), or among
// candidates[0:n_candidates] (item row numbers, in [0, n_items)) when candidates != nullptr; skipping the
// items of the sorted list excl_items[excl_indptr[r] : excl_indptr[r + 1]], r = excl_rows ? excl_rows[q] : q,
// when excl_indptr != nullptr. Writes out_items[q * k + j] (item row, -1 when fewer than j+1 items remain)
// and out_scores[q * k + j] (the score; -inf for padding), best first; ties: the lower item index first.
//
// Refinements of that contract:
//  - A candidate listed more than once counts once (an item is returned at most once per query).
//  - An item whose score is NaN is never returned (it counts as absent: padding may follow).
//  - Each score is one fixed chain of operations, the micro-kernel's over k (dim split into ks.kc chunks
//    added in order, as sgemm does): the same bits whatever n_threads, the other queries of the batch, the
//    candidate list or the path chosen (ks.chain_dots for a few queries, ks.ukernel for many), for a given
//    KernelSet. Selection is by the total order (score desc, item asc), so the result does not depend on how
//    the items were split over threads either.
// The caller has checked the arguments (ranges of candidates, exclusion lists and rows; k >= 1);
// require() failures throw std::invalid_argument only for what the core itself cannot run.
void inner_product_topk(const KernelSet& ks, const float* queries, index_t n_queries, index_t ld_q,
                        const float* items, index_t n_items, index_t ld_i, index_t dim,
                        const std::int32_t* candidates, index_t n_candidates,
                        const std::int64_t* excl_indptr, const std::int32_t* excl_items, const std::int32_t* excl_rows,
                        index_t k, std::int32_t* out_items, float* out_scores, int n_threads);

}  // namespace fastrec
