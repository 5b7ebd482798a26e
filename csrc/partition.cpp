// Balanced partitioning: see partition.h. Every comparison below mirrors megatron_rlvr/data/partition.py
// (stable sorts, (key, index) tie-breaks) so both give the same partition; only additions and
// subtractions of doubles are involved, which IEEE-754 makes identical in both languages.
#include "partition.h"

#include <algorithm>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <utility>

namespace megatron_rlvr {
namespace {

// A partial solution: its non-empty parts by decreasing sum (empty parts are implicit and come last), each
// part a linked list of item indices threaded through a shared next_item array.
struct State {
  std::vector<double> sums;
  std::vector<int64_t> heads;
  std::vector<int64_t> tails;
};

double spread(const State& s, int64_t k) {
  return s.sums.front() - (static_cast<int64_t>(s.sums.size()) == k ? s.sums.back() : 0.0);
}

// Reorders the parts of s by decreasing sum, keeping the current order among equal sums.
void sort_parts(State& s) {
  std::vector<size_t> order(s.sums.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return s.sums[a] > s.sums[b]; });
  State sorted;
  sorted.sums.reserve(order.size());
  sorted.heads.reserve(order.size());
  sorted.tails.reserve(order.size());
  for (size_t j : order) {
    sorted.sums.push_back(s.sums[j]);
    sorted.heads.push_back(s.heads[j]);
    sorted.tails.push_back(s.tails[j]);
  }
  s = std::move(sorted);
}

struct HeapEntry {
  double spread;
  int64_t id;
};

// Python pops the smallest (-spread, id): the largest spread first, then the oldest solution.
struct PopsLargestSpread {
  bool operator()(const HeapEntry& a, const HeapEntry& b) const {
    if (a.spread != b.spread) return a.spread < b.spread;
    return a.id > b.id;
  }
};

}  // namespace

std::vector<std::vector<int64_t>> karmarkar_karp(const std::vector<double>& weights, int64_t k, bool equal_size) {
  const int64_t n = static_cast<int64_t>(weights.size());
  std::vector<int64_t> next_item(n, -1);
  std::vector<State> states;  // indexed by id; a merged-away state is released
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, PopsLargestSpread> heap;

  std::vector<std::vector<int64_t>> groups;
  if (equal_size) {
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return weights[a] != weights[b] ? weights[a] < weights[b] : a < b;
    });
    for (int64_t g = 0; g < n; g += k) groups.emplace_back(order.begin() + g, order.begin() + std::min(g + k, n));
  } else {
    groups.reserve(n);
    for (int64_t i = 0; i < n; ++i) groups.push_back({i});
  }
  states.reserve(2 * groups.size());
  for (auto& group : groups) {
    std::stable_sort(group.begin(), group.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
    State s;
    for (int64_t i : group) {
      s.sums.push_back(weights[i]);
      s.heads.push_back(i);
      s.tails.push_back(i);
    }
    heap.push({spread(s, k), static_cast<int64_t>(states.size())});
    states.push_back(std::move(s));
  }
  groups.clear();

  while (heap.size() > 1) {
    State a = std::move(states[heap.top().id]);
    heap.pop();
    State b = std::move(states[heap.top().id]);
    heap.pop();
    const int64_t count_a = static_cast<int64_t>(a.sums.size());
    const int64_t count_b = static_cast<int64_t>(b.sums.size());
    State merged;
    merged.sums.reserve(std::min(k, count_a + count_b));
    merged.heads.reserve(std::min(k, count_a + count_b));
    merged.tails.reserve(std::min(k, count_a + count_b));
    auto join = [&](int64_t j) {
      const int64_t jb = k - 1 - j;  // heaviest part of one with the lightest part of the other
      if (j >= count_a) {
        merged.sums.push_back(b.sums[jb]);
        merged.heads.push_back(b.heads[jb]);
        merged.tails.push_back(b.tails[jb]);
      } else if (jb >= count_b) {
        merged.sums.push_back(a.sums[j]);
        merged.heads.push_back(a.heads[j]);
        merged.tails.push_back(a.tails[j]);
      } else {
        merged.sums.push_back(a.sums[j] + b.sums[jb]);
        next_item[a.tails[j]] = b.heads[jb];
        merged.heads.push_back(a.heads[j]);
        merged.tails.push_back(b.tails[jb]);
      }
    };
    for (int64_t j = 0; j < count_a; ++j) join(j);
    for (int64_t j = std::max(count_a, k - count_b); j < k; ++j) join(j);
    sort_parts(merged);
    heap.push({spread(merged, k), static_cast<int64_t>(states.size())});
    states.push_back(std::move(merged));
  }

  std::vector<std::vector<int64_t>> parts;
  parts.reserve(k);
  if (!heap.empty()) {
    for (int64_t head : states[heap.top().id].heads) {
      std::vector<int64_t> part;
      for (int64_t i = head; i >= 0; i = next_item[i]) part.push_back(i);
      std::sort(part.begin(), part.end());
      parts.push_back(std::move(part));
    }
  }
  parts.resize(k);
  return parts;
}

std::vector<std::vector<int64_t>> greedy_partition(const std::vector<double>& weights, int64_t k, bool equal_size) {
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t capacity = equal_size ? n / k : n;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return weights[a] != weights[b] ? weights[a] > weights[b] : a < b;
  });
  using Open = std::pair<double, int64_t>;  // (sum, part): smallest sum first, then the lower part index
  std::priority_queue<Open, std::vector<Open>, std::greater<Open>> open_parts;
  for (int64_t j = 0; j < k; ++j) open_parts.push({0.0, j});
  std::vector<std::vector<int64_t>> parts(k);
  for (int64_t i : order) {
    auto [total, j] = open_parts.top();
    open_parts.pop();
    parts[j].push_back(i);
    if (static_cast<int64_t>(parts[j].size()) < capacity) open_parts.push({total + weights[i], j});
  }
  for (auto& part : parts) std::sort(part.begin(), part.end());
  return parts;
}

std::vector<std::vector<int64_t>> partition(const std::vector<double>& weights, int64_t k,
                                            const std::string& method, bool equal_size) {
  if (k < 1) throw std::invalid_argument("partition: number of parts must be >= 1");
  if (equal_size && static_cast<int64_t>(weights.size()) % k != 0)
    throw std::invalid_argument("partition: equal_size needs the item count to be a multiple of the part count");
  if (method == "kk") return karmarkar_karp(weights, k, equal_size);
  if (method == "greedy") return greedy_partition(weights, k, equal_size);
  throw std::invalid_argument("partition: unknown method '" + method + "'; choose 'kk' or 'greedy'");
}

}  // namespace megatron_rlvr
