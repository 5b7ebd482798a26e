// Balanced partitioning of weighted items into k parts (Karmarkar-Karp largest differencing and greedy
// largest-first). The reference semantics, tie-breaking included, are the pure-Python twin in
// megatron_rlvr/data/partition.py; both return identical partitions for identical inputs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace megatron_rlvr {

// Parts of item indices (each sorted ascending); every index in exactly one part. With equal_size every
// part holds weights.size() / k items. Inputs are validated by the Python caller.
std::vector<std::vector<int64_t>> karmarkar_karp(const std::vector<double>& weights, int64_t k, bool equal_size);
std::vector<std::vector<int64_t>> greedy_partition(const std::vector<double>& weights, int64_t k, bool equal_size);
std::vector<std::vector<int64_t>> partition(const std::vector<double>& weights, int64_t k,
                                            const std::string& method, bool equal_size);

}  // namespace megatron_rlvr
