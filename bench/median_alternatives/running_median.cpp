// Measurement aid for bench/median_alternatives/run.py, not part of the library.
//
// exact_running_median: the exact running median of x (length n, odd window 2h+1, edges repeated as
// in scipy.ndimage.median_filter(mode="nearest")), given the ranks r of x (a permutation of 0..n-1
// consistent with x's order) and its inverse ord. It keeps a bitset of the ranks inside the window
// and walks the median's rank up or down as one value enters and one leaves: O(1) amortized per
// step after the O(n log n) argsort, the cheapest exact method we know of for very wide windows.
//
// scalar_sort: std::sort, the scalar comparison sort numpy.sort is usually compared with.
#include <algorithm>
#include <cstdint>
#include <cstdlib>

static inline int64_t next_up(const uint64_t *b, int64_t k) {  // smallest present rank > k
  int64_t j = k + 1, wd = j >> 6;
  uint64_t m = b[wd] & (~0ULL << (j & 63));
  while (!m) m = b[++wd];
  return (wd << 6) + __builtin_ctzll(m);
}

static inline int64_t next_down(const uint64_t *b, int64_t k) {  // largest present rank < k
  int64_t j = k - 1, wd = j >> 6;
  uint64_t m = b[wd] & (~0ULL >> (63 - (j & 63)));
  while (!m) m = b[--wd];
  return (wd << 6) + 63 - __builtin_clzll(m);
}

extern "C" int exact_running_median(const double *x, const int64_t *r, const int64_t *ord, int64_t n,
                                    int64_t h, double *out) {
  if (n <= 0) return 0;
  uint64_t *b = (uint64_t *)calloc((n >> 6) + 2, 8);
  int64_t *cnt = (int64_t *)calloc(n, 8);  // multiplicity: the repeated edges put a rank in twice
  if (!b || !cnt) return 1;
  auto clip = [n](int64_t j) { return j < 0 ? 0 : (j >= n ? n - 1 : j); };
  for (int64_t j = -h; j <= h; j++) {
    int64_t k = r[clip(j)];
    cnt[k]++;
    b[k >> 6] |= 1ULL << (k & 63);
  }
  int64_t cur = 0, below = 0;  // median rank; how many window values rank below it
  for (int64_t acc = 0, k = 0; k < n; k++)
    if (cnt[k]) {
      if (acc + cnt[k] > h) { cur = k; below = acc; break; }
      acc += cnt[k];
    }
  out[0] = x[ord[cur]];
  for (int64_t i = 1; i < n; i++) {
    int64_t ko = r[clip(i - 1 - h)], ki = r[clip(i + h)];
    if (cnt[ki]++ == 0) b[ki >> 6] |= 1ULL << (ki & 63);
    if (ki < cur) below++;
    if (--cnt[ko] == 0) b[ko >> 6] &= ~(1ULL << (ko & 63));
    if (ko < cur) below--;
    if (cnt[cur] == 0) cur = next_up(b, cur);
    while (below > h) { cur = next_down(b, cur); below -= cnt[cur]; }
    while (below + cnt[cur] <= h) { below += cnt[cur]; cur = next_up(b, cur); }
    out[i] = x[ord[cur]];
  }
  free(b);
  free(cnt);
  return 0;
}

extern "C" void scalar_sort(double *x, int64_t n) { std::sort(x, x + n); }
