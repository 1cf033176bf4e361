// A float array of up to gigabytes that the core streams through (the top-k item cache), backed by
// transparent huge pages where the kernel offers them: with 4 KiB pages a gigabyte is 262,144 pages, and
// streaming it pays a TLB miss and page walk every 4 KiB.
#pragma once
#include <cstddef>

namespace fastrec {

class LargeArray {
 public:
  LargeArray() = default;
  LargeArray(const LargeArray&) = delete;
  LargeArray& operator=(const LargeArray&) = delete;
  ~LargeArray() { release(); }
  // n floats, all zero; the old contents are dropped. Throws std::bad_alloc.
  void assign_zeros(std::size_t n);
  float* data() { return data_; }
  const float* data() const { return data_; }

 private:
  void release();
  void* base_ = nullptr;  // the mapping (or allocation) that holds data_
  std::size_t bytes_ = 0;
  float* data_ = nullptr;
};

}  // namespace fastrec
