#include "large_array.h"

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrec {

void LargeArray::release() {
#if defined(__linux__)
  if (base_) munmap(base_, bytes_);
#else
  std::free(base_);
#endif
  base_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

void LargeArray::assign_zeros(std::size_t n) {
  release();
  if (n == 0) return;
#if defined(__linux__)
  // Anonymous pages start zero. Huge pages cover only 2 MiB-aligned ranges, so the data starts on such a
  // boundary; asking before the first touch lets the page faults allocate them ("madvise" mode of
  // /sys/kernel/mm/transparent_hugepage/enabled; advice only: where it fails, 4 KiB pages remain).
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  const std::size_t bytes = n * sizeof(float) + kHuge;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const std::uintptr_t aligned = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) / kHuge * kHuge;
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), n * sizeof(float), MADV_HUGEPAGE);
#endif
  data_ = reinterpret_cast<float*>(aligned);
#else
  const std::size_t bytes = n * sizeof(float);
  void* p = std::calloc(n, sizeof(float));
  if (!p) throw std::bad_alloc();
  data_ = static_cast<float*>(p);
#endif
  base_ = p;
  bytes_ = bytes;
}

}  // namespace fastrec
