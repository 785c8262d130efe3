// A cache of the memory-bound kernels' big output blocks (>= 4 MiB), freed
// blocks kept with their pages mapped.
//
// Why: glibc serves blocks this big with a fresh mmap and unmaps them on free,
// so every call's new gradient is written into pages the kernel must fault in
// and zero first. For OFD's [64, 256, 28, 28] float32 gradient that is 12,545
// faults, and a fresh output cost more than the pass itself (measured: 11-20 ms
// with fresh pages against 6.0 ms into mapped ones). A training loop frees each
// step's gradients before the next step asks for the same sizes, so a freed
// block is handed to the next output of its size, as PyTorch's CUDA caching
// allocator does on a GPU.
//
// Blocks are 2 MiB-aligned multiples of 2 MiB, given huge-page advice when
// first mapped (unless KDKERNELS_HUGEPAGES=0), and reused for an exact match
// of that rounded size. Idle blocks are held up to a limit
// (KDKERNELS_OUTPUT_CACHE_MB, default 1024; 0 turns the cache off, and outputs
// are then plain at::empty with huge-page advice); a block freed beyond it goes
// back to the system. kdkernels.empty_cache() frees the idle ones.
#include "kdkernels.h"

#include <c10/core/Allocator.h>

#include <map>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdk {
namespace {

constexpr size_t kHuge = size_t(1) << 21;
constexpr size_t kMinCachedBytes = 2 * kHuge;

struct Block {
  void* ptr;
  size_t bytes;
};

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

int64_t limit_from_env() {
  const char* v = std::getenv("KDKERNELS_OUTPUT_CACHE_MB");
  if (v == nullptr || *v == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
              "KDKERNELS_OUTPUT_CACHE_MB: expected a non-negative integer (MiB), got '", v, "'");
  return static_cast<int64_t>(mb) << 20;
}

void release_block(void* ctx);

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()), huge_pages_(!env_off("KDKERNELS_HUGEPAGES")) {}

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kHuge - 1) / kHuge * kHuge;
    void* p = take(bytes);
    if (p == nullptr) {
      if (posix_memalign(&p, kHuge, bytes) != 0) {
        TORCH_CHECK(false, "kdkernels: out of memory allocating an output of ", bytes, " bytes");
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge_pages_) madvise(p, bytes, MADV_HUGEPAGE);  // advisory: errors ignored
#endif
    }
    return {p, new Block{p, bytes}, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void give_back(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + static_cast<int64_t>(b->bytes) <= limit_) {
        idle_[b->bytes].push_back(b->ptr);
        idle_bytes_ += static_cast<int64_t>(b->bytes);
        b->ptr = nullptr;
      }
    }
    std::free(b->ptr);  // nullptr when kept
    delete b;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "kdkernels output cache: limit must be >= 0 bytes, got ", bytes);
    bool over;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      over = idle_bytes_ > limit_;
    }
    if (over) empty();
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void empty() {
    std::map<size_t, std::vector<void*>> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    for (auto& [bytes, ptrs] : idle) {
      for (void* p : ptrs) std::free(p);
    }
  }

  bool huge_pages() const { return huge_pages_; }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = idle_.find(bytes);
    if (it == idle_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    idle_bytes_ -= static_cast<int64_t>(bytes);
    return p;
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> idle_;  // rounded size -> idle blocks
  int64_t idle_bytes_ = 0;
  int64_t limit_;
  const bool huge_pages_;
};

// Never destroyed: tensors may outlive static destruction at exit.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void release_block(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

// madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a fresh output of >= 4 MiB.
void advise_huge_pages(const Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t nbytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  if (!cache().huge_pages() || !out.defined() || nbytes < kMinCachedBytes) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory: errors ignored
#else
  (void)out;
#endif
}

}  // namespace

Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  const size_t nbytes = at::detail::computeStorageNbytes(sizes, strides, options.dtype().itemsize());
  if (!options.device().is_cpu() || nbytes < kMinCachedBytes || cache().limit() == 0) {
    Tensor out = at::empty_strided(sizes, strides, options);
    advise_huge_pages(out);
    return out;
  }
  return at::detail::empty_strided_generic(sizes, strides, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           options.dtype().toScalarType());
}

Tensor empty_output_like(const Tensor& x) {
  if (static_cast<size_t>(x.numel()) * x.element_size() < kMinCachedBytes) return at::empty_like(x);
  const Tensor layout = at::empty_like(x, x.options().device(at::kMeta));  // empty_like's strides, no memory
  return empty_output(layout.sizes(), layout.strides(), x.options());
}

int64_t output_cache_idle_bytes() { return cache().idle_bytes(); }
int64_t output_cache_limit() { return cache().limit(); }
void set_output_cache_limit(int64_t bytes) { cache().set_limit(bytes); }
void empty_output_cache() { cache().empty(); }

}  // namespace kdk
