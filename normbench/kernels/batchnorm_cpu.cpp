// normbench's BatchNorm operators (normbench::batch_norm_forward, ...: schemas, CPU kernels and
// autograd, registered with the dispatcher at the end of this file) and their CPU kernel:
// fused passes, OpenMP threads (at::parallel_for), vectorisable inner loops, the ReLU that
// models apply after the norm fused in (forward and backward). Compiled at first use by
// normbench/kernels/cpu.py.
//
// Two memory layouts, chosen per call:
//   planes: channels-first contiguous (N, C, L), L = prod(spatial). In one of two orders:
//           channels: each task owns whole channels and runs both passes of a channel back
//           to back, so the second pass reads the channel from the core's cache: forward =
//           1 read from memory + 1 read from cache + 1 write; backward = 2 reads + 2 reads
//           from cache + 1 write. samples, for inputs that fit the last-level cache: each
//           task owns a run of whole samples, so each pass reads memory in order, and the
//           second pass reads the tensor again from the last-level cache.
//   rows:   (M, C) row-major: channels_last, or 2-d (N, C) input, or L == 1. Tasks own
//           blocks of rows and keep per-channel partial sums, reduced after the pass.
// When there are fewer channels than threads, a channel's rows are split across tasks.
//
// Variance: sums of deviations from a per-channel shift (the channel's first value),
// accumulated in the compute type over short blocks and in double across blocks
// ("shifted, two-level sums"), so data with a large mean keeps its precision. The sums are
// written with GCC's vector types (Vec), which keeps them in registers.
// Half and bfloat16 are computed in float (at::opmath_type), converted a register at a time
// (load_vec, store_vec).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// One vector register: a channel's partial sums, a chunk. The machine's own width: GCC
// lowers a vector type wider than the registers through the stack (64-byte vectors on an
// AVX2 machine made the sums spill every add, and the kernels measurably slower than here:
// benchmarks/README.md).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else  // SSE only (an old CPU, or a VM's CPU model without AVX): 32-byte vectors there made
       // layer steps slower (benchmarks/README.md)
constexpr int kVecBytes = 16;
#endif
constexpr int64_t kLaneBlock = 256;     // values a lane sums in the compute type before a double add
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead a block's runs are prefetched
constexpr int64_t kRunBytes = 2048;       // contiguous bytes a planes block reads per sample
constexpr int64_t kRowBlock = 64;       // rows summed per channel before a double add
constexpr int64_t kParallelWork = 32768;  // below this many values a task runs alone

struct Layout {
  at::Tensor x;  // the input, made contiguous in one of the two layouts
  bool rows;     // true: (M, C) row-major; false: (N, C, L)
  int64_t N, C, L, M;
};

bool channels_last(const at::Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// ---------------------------------------------------------------- argument checks
//
// Every tensor an operator reads or writes through a pointer is checked before its pointer is
// read: its device, dtype and number of values, and where it is written, its layout. The
// wording is torch's batch_norm's where torch refuses the same argument, and so is the order
// (so that a call with two faults fails with torch's exception type): the parameters' sizes,
// the input's dimensions, the devices, the input's dtype, the parameters' dtypes, the running
// statistics' dimensions. A few integer comparisons a tensor: nothing next to a kernel's run.

// The dtypes the kernels compute in.
bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

const at::Tensor* given(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// The number of values a parameter must have: x's channels (torch counts none in an input of
// fewer than 2 dimensions, which it then refuses).
int64_t channels_of(const at::Tensor& x) { return x.dim() >= 2 ? x.size(1) : 0; }

// A tensor of one value per channel (weight, bias, running statistics, mean, invstd), in any
// shape (torch takes a (1, C) weight; per_channel reads it in order).
void check_size(const at::Tensor* t, const char* name, int64_t C) {
  if (t == nullptr) return;
  TORCH_CHECK(t->numel() == C, name, " should contain ", C, " elements not ", t->numel());
}

// x: (N, C, *) with C > 0 (zero channels would divide by zero below: SIGFPE).
void check_input_shape(const at::Tensor& x) {
  const int64_t dims = std::max<int64_t>(1, x.dim());
  TORCH_CHECK_INDEX(x.dim() >= 2, "Dimension out of range (expected to be in range of [", -dims,
                    ", ", dims - 1, "], but got 1)");
  TORCH_CHECK_VALUE(x.size(1) > 0, "BatchNorm needs at least one channel, got input size ",
                    x.sizes());
}

void check_device(const at::Tensor* t) {
  if (t == nullptr) return;
  TORCH_CHECK(t->is_cpu(), "Tensor on device ", t->device(), " is not on the expected device cpu!");
}

void check_input_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.is_cpu(), "normbench's CPU kernel got a ", x.device(), " tensor");
  TORCH_CHECK_NOT_IMPLEMENTED(kernel_dtype(x.scalar_type()), "\"batch_norm\" not implemented for '",
                              x.scalar_type(), "'");
}

// The parameters' dtypes as torch's batch_norm takes them on the CPU: the parameters given
// (weight, bias, running_mean, running_var, in that order) all of x's dtype; or, when the
// first is not, all float32 with a float16 or bfloat16 x (mixed precision).
void check_dtypes(const at::Tensor& x, std::initializer_list<const at::Tensor*> params) {
  const at::Tensor* first = nullptr;
  for (const at::Tensor* p : params) {
    if (p != nullptr) {
      first = p;
      break;
    }
  }
  if (first == nullptr) return;
  const auto type = x.scalar_type();
  if (first->scalar_type() == type) {
    for (const at::Tensor* p : params) {
      TORCH_CHECK(p == nullptr || p->scalar_type() == type, "expected scalar type ", type,
                  " but found ", p->scalar_type());
    }
    return;
  }
  for (const at::Tensor* p : params) {
    TORCH_CHECK(p == nullptr || p->scalar_type() == at::kFloat,
                "mixed dtype (CPU): expect parameter to have scalar type of Float");
  }
  TORCH_CHECK(reduced_float(type), "mixed dtype (CPU): all inputs must share same datatype.");
}

// Running statistics: autograd does not track them (torch's refusal, under grad mode; the
// eval checks it in its autograd kernel, as its Function's forward runs without grad mode).
void check_untracked(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()),
              "The function 'batch_norm' is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
}

// A running statistic has one dimension, as torch asks; `written` (the update): no two of its
// values in one place (an expanded tensor).
void check_running_layout(const at::Tensor& t, const char* name, bool written) {
  TORCH_CHECK(t.dim() == 1, "expected ", name, " to have 1 dims but tensor has ", t.dim());
  TORCH_CHECK(!written || t.numel() <= 1 || t.stride(0) != 0,
              "unsupported operation: more than one element of the written-to tensor refers to a "
              "single memory location. Please clone() the tensor before performing the operation.");
}

// The batch's statistics handed back to the backward or the update: C values of a floating
// dtype on the CPU.
void check_statistic(const at::Tensor& t, const char* name, int64_t C) {
  check_size(&t, name, C);
  check_device(&t);
  TORCH_CHECK(kernel_dtype(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// The training forward's (and the statistics') arguments: x, and the weight and bias given.
void check_affine(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias) {
  const at::Tensor *w = given(weight), *b = given(bias);
  check_size(w, "weight", channels_of(x));
  check_size(b, "bias", channels_of(x));
  check_input_shape(x);
  check_device(w);
  check_device(b);
  check_input_dtype(x);
  check_dtypes(x, {w, b});
}

// The eval's arguments, in torch's order: the running statistics, weight and bias of C
// values, ..., the running statistics 1-d.
void check_eval(const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  const at::Tensor *w = given(weight), *b = given(bias);
  const int64_t C = channels_of(x);
  check_size(&running_mean, "running_mean", C);
  check_size(&running_var, "running_var", C);
  check_size(w, "weight", C);
  check_size(b, "bias", C);
  check_input_shape(x);
  for (const at::Tensor* t : {&running_mean, &running_var, w, b}) check_device(t);
  check_input_dtype(x);
  check_dtypes(x, {w, b, &running_mean, &running_var});
  check_running_layout(running_mean, "running_mean", /*written=*/false);
  check_running_layout(running_var, "running_var", /*written=*/false);
}

Layout layout_of(const at::Tensor& input) {
  check_input_shape(input);
  check_input_dtype(input);
  Layout lay;
  lay.N = input.size(0);
  lay.C = input.size(1);
  lay.L = input.numel() / std::max<int64_t>(1, lay.N * lay.C);
  lay.M = lay.N * lay.L;
  if (input.is_contiguous()) {
    lay.x = input;
    lay.rows = lay.L == 1;
  } else if (channels_last(input)) {
    lay.x = input;
    lay.rows = true;
  } else {
    lay.x = input.contiguous();  // any other strides: one copy, then planes
    lay.rows = lay.L == 1;
  }
  return lay;
}

// ---------------------------------------------------------------- streaming stores
//
// An output at least stream_threshold() bytes large is written with streaming (non-temporal)
// stores: they go to memory without first reading each line for ownership, and without
// evicting the cache's other data for lines nobody reads again soon. The default is a quarter
// of the last-level cache (glibc's memcpy, too, streams copies above a fraction of it): an
// output that large is mostly out of the cache again by the time the next layer reads it.
// Measured on an AMD EPYC, training forward+backward with cold caches: faster with large
// outputs streamed, on the AVX-512 and the AVX2 paths; streamed too, the small outputs of a
// batch of 8 made small_cnn training slower (benchmarks/README.md).
// NORMBENCH_KERNEL_STREAM_BYTES sets the threshold instead (0: every output that can be).

// The size of cpu0's level-`level` data (or unified) cache as Linux lists it, or with level
// 0 of its largest cache: the last level, as normbench bench's largest_cache_bytes reads it
// (sysconf's figure is the whole package's on some VMs: 384 MiB where Linux reports 32 MiB);
// 0 if unknown.
int64_t cache_bytes(int level) {
  int64_t bytes = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream size_file(dir + "/size"), level_file(dir + "/level"), type_file(dir + "/type");
    std::string size, type;
    int listed = 0;
    if (!(size_file >> size) || size.empty()) continue;
    if (level != 0 && (!(level_file >> listed) || listed != level || !(type_file >> type) ||
                       type == "Instruction")) {
      continue;
    }
    int64_t value = std::atoll(size.c_str());
    if (size.back() == 'K') value <<= 10;
    if (size.back() == 'M') value <<= 20;
    if (size.back() == 'G') value <<= 30;
    bytes = std::max(bytes, value);
  }
  return bytes;
}

int64_t last_level_cache_bytes() { return cache_bytes(0); }

// A size in bytes from the environment variable `name` (a whole number, checked: cpu.py's
// check_environment applies the same rule before any work); none where it is not set.
std::optional<int64_t> env_bytes(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr) return std::nullopt;
  const std::string digits(text);
  TORCH_CHECK(!digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos,
              name, "=", text, ": expected a whole number of bytes, 0 or more");
  return std::strtoll(text, nullptr, 10);
}

constexpr const char* kStreamEnv = "NORMBENCH_KERNEL_STREAM_BYTES";

int64_t stream_threshold() {
  // read on every call (microseconds below a layer's time), so a process can change it
  if (const auto bytes = env_bytes(kStreamEnv)) return *bytes;  // LLONG_MAX when larger: never
  static const int64_t fallback = [] {
    const int64_t llc = last_level_cache_bytes();
    return llc > 0 ? llc / 4 : int64_t(8) << 20;
  }();
  return fallback;
}

constexpr int64_t kLineBytes = 64;  // a cache line

// Whether block_map streams `out`, of layout g: large enough, of a type the kernels compute
// in (float, double), in planes of whole aligned cache lines. A line
// partly streamed and partly stored (planes of 7x7 or 14x14 floats, which share lines with
// their neighbours) made those layers slower than plain stores; so did streaming only their
// whole lines, with masked stores at the planes' edges (benchmarks/README.md).
bool streams(const at::Tensor& out, const Layout& g) {
#if defined(__SSE2__)
  const auto type = out.scalar_type();
  return !g.rows && (type == at::kFloat || type == at::kDouble) &&
         g.L * out.element_size() % kLineBytes == 0 &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % kLineBytes == 0 &&
         out.numel() * out.element_size() >= stream_threshold();
#else
  return false;
#endif
}

// ---------------------------------------------------------------- the output pool
//
// A training step frees its large outputs and the next step asks for the same sizes again.
// glibc returns a freed block above its mmap threshold (128 KiB at first; it adapts up to 32
// MiB) to the kernel, which zeroes each 4 KiB page of the next one at its first write: a page
// fault each. In a user's script (no allocator tuning, as normbench's runs have) a layer then
// spends more time in faults than in the kernel. A training step of BatchNorm2d
// (benchmarks/plain_layer.py) is fastest with this pool, slower where glibc's defaults fault
// its outputs in, and slowest where every block is mapped afresh (activations above 32 MiB
// always are): benchmarks/README.md.
//
// So the kernels' outputs of at least kPoolMinBytes come from a pool of the blocks that earlier
// outputs left: exact sizes, the most recently freed first. It keeps at most pool_limit() bytes
// (NORMBENCH_KERNEL_POOL_BYTES, 0 to switch it off; by default 1/16 of physical memory, at most
// 1 GiB), dropping the oldest blocks first. The lock is only ever tried: a busy pool (or one
// locked when the process forked) allocates or frees the block directly instead of waiting.

constexpr const char* kPoolEnv = "NORMBENCH_KERNEL_POOL_BYTES";
constexpr size_t kPoolMinBytes = size_t(64) << 10;
constexpr size_t kBlockHeader = 64;  // a block starts with its size; its data, 64-byte aligned

struct OutputPool {
  std::mutex lock;
  std::vector<std::pair<size_t, void*>> kept;  // (data bytes, block), oldest first
  size_t kept_bytes = 0;
  std::atomic<int64_t> limit{0};  // the last limit read, for the deleter (which must not throw)
};

// Never destroyed: a tensor may be freed after the library's static destructors have run.
OutputPool& output_pool() {
  static auto* pool = new OutputPool;
  return *pool;
}

int64_t pool_limit() {
  // read on every allocation (microseconds below a layer's time), so a process can change it
  int64_t limit;
  if (const auto bytes = env_bytes(kPoolEnv)) {
    limit = *bytes;
  } else {
    static const int64_t fallback = [] {
      const int64_t pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
      const int64_t sixteenth = pages > 0 && page > 0 ? pages / 16 * page : 0;
      return std::min(sixteenth, int64_t(1) << 30);
    }();
    limit = fallback;
  }
  output_pool().limit.store(limit, std::memory_order_relaxed);
  return limit;
}

void release_block(void* block) {
  const size_t bytes = *static_cast<size_t*>(block);
  auto& pool = output_pool();
  const auto limit = static_cast<size_t>(pool.limit.load(std::memory_order_relaxed));
  std::vector<void*> dropped;
  {
    std::unique_lock<std::mutex> guard(pool.lock, std::try_to_lock);
    if (guard.owns_lock() && bytes <= limit) {
      pool.kept.emplace_back(bytes, block);
      pool.kept_bytes += bytes;
      size_t oldest = 0;
      while (pool.kept_bytes > limit) {
        pool.kept_bytes -= pool.kept[oldest].first;
        dropped.push_back(pool.kept[oldest++].second);
      }
      pool.kept.erase(pool.kept.begin(), pool.kept.begin() + oldest);
    } else {
      dropped.push_back(block);
    }
  }
  for (void* old : dropped) std::free(old);  // outside the lock: a munmap takes a while
}

void* take_block(size_t bytes) {
  auto& pool = output_pool();
  {
    std::unique_lock<std::mutex> guard(pool.lock, std::try_to_lock);
    if (guard.owns_lock()) {
      for (auto it = pool.kept.rbegin(); it != pool.kept.rend(); ++it) {
        if (it->first != bytes) continue;
        void* block = it->second;
        pool.kept_bytes -= bytes;
        pool.kept.erase(std::next(it).base());
        return block;
      }
    }
  }
  void* block = nullptr;
  if (posix_memalign(&block, kBlockHeader, kBlockHeader + bytes) != 0) {
    throw c10::OutOfMemoryError(
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
        "normbench: could not allocate " + std::to_string(bytes) + " bytes");
  }
  *static_cast<size_t*>(block) = bytes;
  return block;
}

// The pool as a c10::Allocator, so that its tensors are ordinary ones (resizable, and freed
// through their storage's deleter, release_block).
struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kPoolMinBytes || pool_limit() == 0) return c10::GetCPUAllocator()->allocate(bytes);
    void* block = take_block(bytes);
    return {static_cast<char*>(block) + kBlockHeader, block, &release_block,
            c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator pool_allocator;

// The bytes the pool keeps now, for tests and reports.
int64_t pool_bytes() {
  auto& pool = output_pool();
  std::lock_guard<std::mutex> guard(pool.lock);
  return static_cast<int64_t>(pool.kept_bytes);
}

// Every kept block freed (as torch.cuda.empty_cache does for CUDA's caching allocator): the
// bytes handed back.
int64_t empty_pool() {
  auto& pool = output_pool();
  std::vector<std::pair<size_t, void*>> kept;
  {
    std::lock_guard<std::mutex> guard(pool.lock);
    kept.swap(pool.kept);
    pool.kept_bytes = 0;
  }
  int64_t freed = 0;
  for (auto& [bytes, block] : kept) {
    freed += static_cast<int64_t>(bytes);
    std::free(block);
  }
  return freed;
}

// Outputs (from the pool) allocated without the dispatcher (they are CPU tensors by
// construction): an operator call costs microseconds when the caches are cold, as after any
// large layer.
at::Tensor empty_as(const at::Tensor& x) {
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &pool_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           x.scalar_type());
}

at::Tensor empty_channels(int64_t C, at::ScalarType dtype) {
  return at::detail::empty_cpu({C}, dtype);
}

int64_t grain_for(int64_t tasks, int64_t work_per_task) {
  // at::parallel_for runs inline when the range is no larger than the grain
  const int64_t g = (kParallelWork + work_per_task - 1) / std::max<int64_t>(1, work_per_task);
  return std::max<int64_t>(1, std::min(g, tasks));
}

// Per-channel constants, in the compute type, from an optional tensor of C values of any float
// dtype (checked by the operator: check_size, check_device), in their logical order: a 1-d
// tensor by its stride (sliced, or expanded with stride 0), any other shape ((1, C), (C, 1, 1),
// 0-d) as a flat view of it (a copy where it has no such view).
// Read directly: a tensor op here would cost more than the whole kernel on small inputs.
template <typename acc_t>
std::vector<acc_t> per_channel(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->numel() == C && t->is_cpu(), "expected ", C,
                " per-channel values on the CPU, got ", t->numel(), " on ", t->device());
    const at::Tensor flat = t->dim() == 1 ? *t : t->reshape({C});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "per_channel", [&] {
      const scalar_t* p = flat.const_data_ptr<scalar_t>();
      const int64_t stride = flat.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        out[c] = static_cast<acc_t>(static_cast<double>(p[c * stride]));
      }
    });
  }
  return out;
}

// A channel's shift for the shifted sums (its first value): 0 where that value is not
// finite, so that an infinite value gives an infinite mean and a NaN variance, as torch's.
template <typename acc_t>
inline acc_t shift_of(acc_t first) {
  return std::isfinite(first) ? first : acc_t(0);
}

// ---------------------------------------------------------------- planes (N, C, L)
//
// A task owns a block of adjacent channels [c0, c1): for every sample, the block's rows
// are one contiguous run of (c1 - c0) * L values. Blocks are sized so a run is at least
// kRunBytes long: one 8x8 row (256 bytes) at a time, C * L values apart, gives the
// hardware prefetcher nothing to follow; a block's runs are prefetched a few ahead (about
// kPrefetchBytes): the first pass's inputs for reading, the second pass's outputs for
// writing (each line's store otherwise waits on its read for ownership, the run being a new
// page to the hardware prefetcher: with them, fwd+bwd steps measured faster with cold caches
// than with the inputs' prefetched alone, benchmarks/README.md).
// A block's data (N runs) is small enough to be read again from the core's cache by the
// second pass.

template <bool kWrite = false, typename T>
inline void prefetch_run(const T* p, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < len * static_cast<int64_t>(sizeof(T)); i += 64) {
    __builtin_prefetch(bytes + i, kWrite ? 1 : 0, 1);
  }
}

// Samples ahead that a block's runs of `run_bytes` are prefetched.
inline int64_t prefetch_ahead(int64_t run_bytes) {
  return std::clamp<int64_t>(kPrefetchBytes / std::max<int64_t>(1, run_bytes), 1, 8);
}

// Channels per block: runs of >= kRunBytes, but at least a block for every thread.
int64_t block_channels(const Layout& g, int64_t itemsize) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = std::max<int64_t>(1, kRunBytes / std::max<int64_t>(1, g.L * itemsize));
  return std::max<int64_t>(1, std::min(wanted, g.C / std::max<int64_t>(1, threads)));
}

// Vectors of the compute type, with GCC's vector extensions: the sums below are written
// with them, so that their partial sums stay in registers (the auto-vectoriser keeps an
// array of partial sums in memory, and each add then waits on the store of the one before).
template <typename T>
struct VecOf;
// `mask`: the integer vector of the same lanes, what comparisons of `type`s give.
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t mask __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t mask __attribute__((vector_size(kVecBytes)));
};
template <typename acc_t>
using Vec = typename VecOf<acc_t>::type;
template <typename acc_t>
using Mask = typename VecOf<acc_t>::mask;
template <typename acc_t>
constexpr int kWidth = kVecBytes / sizeof(acc_t);

#if defined(__F16C__)
// float16 <-> float, one Vec<float> at a time (16 values with AVX-512, 8 with AVX2).
// c10::Half converts one value per call, which the compiler does not vectorise: with it,
// float16 layer steps ran slower than torch's (benchmarks/README.md).
inline Vec<float> half_to_float(const c10::Half* p) {
  Vec<float> v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  static_assert(sizeof(f) == sizeof(v), "one register of floats");
  std::memcpy(&v, &f, sizeof(v));
  return v;
}

// Rounded to nearest even, as c10::Half's own conversion.
inline void float_to_half(c10::Half* p, const Vec<float>& v) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, kRound));
#else
  __m256 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, kRound));
#endif
}
#endif

// bfloat16 <-> float, one Vec<float> at a time, in GCC's vector extensions (converted element
// by element with c10::BFloat16, bfloat16 layer steps ran slower than torch's:
// benchmarks/README.md).
typedef uint16_t U16xW __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t U32xW __attribute__((vector_size(kVecBytes)));

inline Vec<float> bfloat16_to_float(const c10::BFloat16* p) {
  U32xW bits;
#if defined(__AVX512F__)  // one vpmovzxwd: GCC 12 widens a 16-lane vector in halves
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&bits, &w, sizeof(bits));
#elif defined(__AVX2__)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&bits, &w, sizeof(bits));
#else
  U16xW h;
  std::memcpy(&h, p, sizeof(h));
  bits = __builtin_convertvector(h, U32xW);
#endif
  bits <<= 16;
  Vec<float> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Float bits rounded to nearest even at bfloat16's precision, in their top 16 bits (the
// low ones are the caller's to drop): c10::BFloat16's rounding, NaN aside.
inline U32xW bfloat16_rounding(const U32xW& bits) {
  return bits + (((bits >> 16) & 1u) + 0x7FFFu);
}

// Rounded to nearest even, NaN to 0x7FC0: c10::BFloat16's own conversion.
inline void float_to_bfloat16(c10::BFloat16* p, const Vec<float>& v) {
  U32xW bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const U32xW rounded = bfloat16_rounding(bits) >> 16;
  const U32xW nan = U32xW{} + 0x7FC0u;
  const U16xW h = __builtin_convertvector(v != v ? nan : rounded, U16xW);
  std::memcpy(p, &h, sizeof(h));
}

// kWidth values from p, in the compute type (a plain load where the types agree).
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, kVecBytes);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    v = bfloat16_to_float(p);
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    v = half_to_float(p);
#endif
  } else {
    acc_t t[kWidth<acc_t>];
    for (int k = 0; k < kWidth<acc_t>; ++k) t[k] = static_cast<acc_t>(p[k]);
    std::memcpy(&v, t, kVecBytes);
  }
  return v;
}

// kWidth values of the compute type into p, as scalar_t.
template <typename acc_t, typename scalar_t>
inline void store_vec(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, kVecBytes);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float_to_bfloat16(p, v);
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float_to_half(p, v);
#endif
  } else {
    acc_t t[kWidth<acc_t>];
    std::memcpy(t, &v, kVecBytes);
    for (int k = 0; k < kWidth<acc_t>; ++k) p[k] = static_cast<scalar_t>(t[k]);
  }
}

#if defined(__SSE2__)
// store_vec to memory, bypassing the caches (p aligned to kVecBytes; float and double). A Vec
// and the intrinsics' register type of its width are the same GCC vector: a cast reinterprets.
template <typename acc_t>
inline void stream_vec(acc_t* p, const Vec<acc_t>& v) {
  static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);
  constexpr bool single = std::is_same_v<acc_t, float>;
#if defined(__AVX512F__)
  if constexpr (single) _mm512_stream_ps(p, (__m512)v); else _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
  if constexpr (single) _mm256_stream_ps(p, (__m256)v); else _mm256_stream_pd(p, (__m256d)v);
#else
  if constexpr (single) _mm_stream_ps(p, (__m128)v); else _mm_stream_pd(p, (__m128d)v);
#endif
}
#endif

// The activation fused into the passes (a scalar or a Vec): max(z, 0), NaN kept as
// torch.relu keeps it; and the gradient through it, 0 where z <= 0 and else dy (a NaN z
// passing dy), as torch's threshold_backward gives it (z is recomputed from x by the same expression as the
// forward's, so the mask is the forward's).
template <typename T>
inline T relu(T z) {
  const T zero{};
  return z < zero ? zero : z;
}

// z, or relu(z) with kRelu: the forward's output and the eval's.
template <bool kRelu, typename T>
inline T activate(T z) {
  if constexpr (kRelu) {
    return relu(z);
  } else {
    return z;
  }
}

template <typename T>
inline T relu_grad(T dy, T z) {
  const T zero{};
  return z <= zero ? zero : dy;  // a NaN z passes dy, as threshold_backward
}

// Lanes [first, kWidth) of a vector: the mask that keeps a run's last values from a vector
// loaded so that it ends where the run ends (see run_sums, block_map).
template <typename acc_t>
inline Mask<acc_t> lanes_from(int64_t first) {
  Mask<acc_t> lane;  // 0, 1, ..., kWidth - 1: a constant once inlined
  for (int k = 0; k < kWidth<acc_t>; ++k) lane[k] = k;
  return lane >= static_cast<decltype(+lane[0])>(first);
}

// Adds one channel's run of L values into its kWidth partial sums p1, p2: `t(a, b, u, v)`,
// the channel's term (its constants held by value, so they stay in registers), gives the
// two summands of values a (from pa) and b (from pb), for vectors and for scalars.
// The run is summed in four independent register sums, added into p1, p2 once: in a
// microbenchmark, the sums of 8x8 planes ran faster that way than with adds into p1, p2 in place.
// A run's last L % kWidth values (14x14 planes: 4 of 196) are one more vector, loaded to end
// where the run ends, its lanes already summed masked off; element by element, they took a
// large share of the sums' time (benchmarks/README.md).
template <typename acc_t, typename scalar_t, typename Term>
inline void run_sums(const scalar_t* pa, const scalar_t* pb, int64_t L, const Term& t,
                     acc_t* p1, acc_t* p2) {
  using V = Vec<acc_t>;
  constexpr int W = kWidth<acc_t>;
  // Named, not an array: an array indexed in a loop may be kept in memory.
  V a1 = {}, b1 = {}, c1 = {}, d1 = {}, a2 = {}, b2 = {}, c2 = {}, d2 = {};
  auto add = [&](int64_t l, V& s1, V& s2) {
    V u, v;
    t(load_vec<acc_t>(pa + l), load_vec<acc_t>(pb + l), u, v);
    s1 += u;
    s2 += v;
  };
  int64_t l = 0;
  for (; l + 4 * W <= L; l += 4 * W) {
    add(l, a1, a2);
    add(l + W, b1, b2);
    add(l + 2 * W, c1, c2);
    add(l + 3 * W, d1, d2);
  }
  if (l + W <= L) add(l, a1, a2), l += W;  // fewer than four vectors are left
  if (l + W <= L) add(l, b1, b2), l += W;
  if (l + W <= L) add(l, c1, c2), l += W;
  acc_t r1 = 0, r2 = 0;  // a run shorter than a vector, summed element by element
  if (l < L && L >= W) {
    V u, v;
    t(load_vec<acc_t>(pa + L - W), load_vec<acc_t>(pb + L - W), u, v);
    const auto keep = lanes_from<acc_t>(W - (L - l));
    d1 += keep ? u : V{};
    d2 += keep ? v : V{};
  } else {
    for (; l < L; ++l) {
      acc_t u, v;
      t(static_cast<acc_t>(pa[l]), static_cast<acc_t>(pb[l]), u, v);
      r1 += u;
      r2 += v;
    }
  }
  V s1, s2;
  std::memcpy(&s1, p1, kVecBytes);
  std::memcpy(&s2, p2, kVecBytes);
  s1 += (a1 + b1) + (c1 + d1);
  s2 += (a2 + b2) + (c2 + d2);
  s1[0] += r1;
  s2[0] += r2;
  std::memcpy(p1, &s1, kVecBytes);
  std::memcpy(p2, &s2, kVecBytes);
}

// Per-channel sums over samples [n0, n1) of the block [c0, c1): `term(c)`, channel c's term
// (see run_sums), gives the two summands of the values of `a` and `b` at one index
// (b = nullptr: a again), added into
// s1[c - c0] and s2[c - c0]. Each channel keeps kWidth partial sums across its rows (a short
// row would otherwise pay a horizontal reduction per row) and moves them to double every
// kLaneBlock additions. `prefetch`: the block's runs a few samples ahead (see prefetch_run).
template <typename acc_t, typename scalar_t, typename Term>
void block_sums(const Layout& g, int64_t c0, int64_t c1, int64_t n0, int64_t n1,
                const scalar_t* a, const scalar_t* b, Term term, double* s1, double* s2,
                bool prefetch = true) {
  constexpr int W = kWidth<acc_t>;
  const int64_t cb = c1 - c0;
  std::vector<acc_t> lanes(2 * cb * W, acc_t(0));
  acc_t* v1 = lanes.data();
  acc_t* v2 = v1 + cb * W;
  const int64_t run = cb * g.L;
  const int64_t ahead = prefetch_ahead(run * sizeof(scalar_t));
  const int64_t adds_per_sample = (g.L + W - 1) / W;
  int64_t pending = 0;
  auto flush = [&] {
    for (int64_t j = 0; j < cb; ++j) {
      for (int k = 0; k < W; ++k) {
        s1[j] += v1[j * W + k];
        s2[j] += v2[j * W + k];
      }
    }
    std::fill(lanes.begin(), lanes.end(), acc_t(0));
    pending = 0;
  };
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * g.C + c0) * g.L;
    if (prefetch && n + ahead < n1) {
      const int64_t next = base + ahead * g.C * g.L;
      prefetch_run(a + next, run);
      if (b != nullptr) prefetch_run(b + next, run);
    }
    for (int64_t j = 0; j < cb; ++j) {
      const int64_t off = base + j * g.L;
      run_sums<acc_t>(a + off, (b != nullptr ? b : a) + off, g.L, term(c0 + j), v1 + j * W,
                      v2 + j * W);
    }
    pending += adds_per_sample;
    if (pending >= kLaneBlock) flush();
  }
  flush();
}

// out = map(c)(a, b) for every value of samples [n0, n1) in the block [c0, c1), where a and b
// are the values of `a` and `b` (b = nullptr: a again) at the same index, in the compute
// type, and map(c) is channel c's map, its constants held by value: read through the
// caller's arrays, they were loaded again for every vector, as the stores to `out` may
// alias them. Vectors of kWidth; a plane's last L % kWidth values are one more vector that
// ends where the plane ends, writing again the same values over the lanes already written
// (`out` is never `a` or `b`); planes shorter than a vector, element by element.
// `stream` (see streams(): planes of whole aligned lines): every vector is streamed.
// `prefetch`: the output's runs a few samples ahead, for writing (not where streamed).
template <typename acc_t, typename scalar_t, typename Map>
void block_map(const Layout& g, int64_t c0, int64_t c1, int64_t n0, int64_t n1,
               const scalar_t* a, const scalar_t* b, scalar_t* out, Map& map, bool stream,
               bool prefetch = true) {
  constexpr int W = kWidth<acc_t>;
  if (b == nullptr) b = a;
  const int64_t L = g.L;
  const int64_t ahead = prefetch_ahead((c1 - c0) * L * sizeof(scalar_t));
  for (int64_t n = n0; n < n1; ++n) {
    // streamed lines are not read for ownership: nothing to prefetch for them
    if (prefetch && !stream && n + ahead < n1) {
      prefetch_run<true>(out + ((n + ahead) * g.C + c0) * L, (c1 - c0) * L);
    }
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* pa = a + (n * g.C + c) * L;
      const scalar_t* pb = b + (n * g.C + c) * L;
      scalar_t* po = out + (n * g.C + c) * L;
      const auto f = map(c);
      if (L < W) {
        for (int64_t j = 0; j < L; ++j) {
          po[j] = static_cast<scalar_t>(f(static_cast<acc_t>(pa[j]), static_cast<acc_t>(pb[j])));
        }
        continue;
      }
#if defined(__SSE2__)
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        if (stream) {  // whole aligned lines (streams()): L is a multiple of W
#pragma GCC unroll 4
          for (int64_t l = 0; l < L; l += W) {
            stream_vec<acc_t>(po + l, f(load_vec<acc_t>(pa + l), load_vec<acc_t>(pb + l)));
          }
          continue;
        }
      }
#endif
      int64_t l = 0;
      // unrolled: faster at 14x14 and 28x28 planes than one vector an iteration
      // (benchmarks/README.md)
#pragma GCC unroll 4
      for (; l + W <= L; l += W) {
        store_vec<acc_t>(po + l, f(load_vec<acc_t>(pa + l), load_vec<acc_t>(pb + l)));
      }
      if (l < L) {
        store_vec<acc_t>(po + L - W, f(load_vec<acc_t>(pa + L - W), load_vec<acc_t>(pb + L - W)));
      }
    }
  }
#if defined(__SSE2__)
  if (stream) _mm_sfence();  // the streamed stores ordered before the task ends, as plain ones are
#endif
}

// Fewer channels than threads: split each channel's samples into `parts` tasks.
int64_t plane_parts(const Layout& g) {
  const int64_t threads = at::get_num_threads();
  if (g.C >= threads || g.N < 2 || g.N * g.L < 2 * kParallelWork) return 1;
  return std::min<int64_t>(g.N, (threads + g.C - 1) / g.C);
}

// The planes layout's order. The channels order reads each sample's rows of a task's block
// of channels: runs of a few KiB, C * L values apart, which the hardware prefetchers follow
// worse than memory read in order; and its second pass finds the block in the core's L2
// only while the block (N runs) fits there. The samples order reads memory in order (tasks
// own runs of whole samples; each task's per-channel sums are added up after the pass),
// its second pass reading the tensor again from the last-level cache, or from memory.
// It is taken for inputs larger than the core's L2 (below that, the channels order's second
// pass reads from L1 or L2) and either at most half the last-level cache (the other half
// left to the outputs, streamed past it once they reach a quarter of it, see
// stream_threshold, and to other data, so the second pass finds the inputs there) or
// whose channel blocks would fill more than half the L2
// (the channels order's second pass would miss it too); not with fewer samples than
// threads (one would idle), nor with so many channels that a task's partial sums (2
// vectors a channel) would not stay in L1. Timed as a training step of the layer, the two
// orders interleaved in one process (benchmarks/plane_order.py; the figures are in
// benchmarks/README.md): on AMD EPYC Zen 5 and Zen 4, this rule's order was as fast or faster
// on the shapes it gives the samples order, those whose channel blocks fill the L2 and those
// whose inputs are between a quarter and half the L3 (with a quarter as the bound, as
// before, those were slower). Where the inputs do not fit half the cache and the blocks fit
// the L2, the samples order was no faster on Zen 5, and the channels order stays; on Zen 4
// such a backward alone ran faster in it, but larger planes slower.
// On an Intel Xeon (2 MiB L2, a 260 MiB L3 shared with its host) this rule takes the samples
// order nearly everywhere, and at 14x14 to 56x56 planes the channels order was faster: one
// core read its L3 at a fraction of its L2's speed (benchmarks/cache_bandwidth.py), so the
// channels order's second pass from the L2 wins.
// The rule stays until the same bandwidths are measured on an AMD EPYC: one by them could
// serve both (whole small_cnn training steps moved within noise either way).
// The samples order issues no software prefetches: memory read and written in order is the
// hardware prefetchers' own case, and with the channels order's prefetches its layer steps
// ran slower.
// NORMBENCH_KERNEL_PLANE_ORDER=channels or samples forces one order for every input.
constexpr const char* kOrderEnv = "NORMBENCH_KERNEL_PLANE_ORDER";
constexpr int64_t kMaxLaneBytes = 32 << 10;  // a task's partial sums in the samples order

// The order asked for in the environment (cpu.py's check_environment applies the same rule
// before any work): "auto" where it is not set.
std::string order_asked() {
  const char* text = std::getenv(kOrderEnv);
  const std::string order = text == nullptr ? "auto" : text;
  TORCH_CHECK(order == "auto" || order == "channels" || order == "samples", kOrderEnv, "=",
              order, ": valid are auto, channels, samples");
  return order;
}

// Whether the planes layout `g` is read in the samples order by a pass that reads `inputs`
// tensors of that layout, of `itemsize` bytes a value.
bool samples_order(const Layout& g, int64_t itemsize, int64_t inputs) {
  const std::string order = order_asked();
  if (order != "auto") return order == "samples";
  static const int64_t l2 = cache_bytes(2), llc = last_level_cache_bytes();
  const int64_t in_bytes = g.M * g.C * itemsize * inputs;
  // what the channels order's second pass would read again: a block of channels
  const int64_t block_bytes = g.N * block_channels(g, itemsize) * g.L * itemsize * inputs;
  return l2 > 0 && llc > 0 && in_bytes > l2 && (in_bytes <= llc / 2 || block_bytes > l2 / 2) &&
         g.N >= at::get_num_threads() && g.C * 2 * kVecBytes <= kMaxLaneBytes;
}

// The order the CPU kernels read `x` in: "rows" (channels_last, 2-d, or one value per
// plane), else the planes layout's order (see samples_order) for the forward, or with
// `backward` for the backward, which reads dy too. For tests and reports.
std::string plane_order(const at::Tensor& x, bool backward) {
  const Layout g = layout_of(x);
  if (g.rows) return "rows";
  return samples_order(g, g.x.element_size(), backward ? 2 : 1) ? "samples" : "channels";
}

// The planes layout's two passes: per-channel sums of `term(c)` over every sample, then
// `finish(c, s1, s2)` for each channel, then `map(c)` for every value (see block_sums and
// block_map: both read `a` and `b`, b = nullptr meaning a; term(c) and map(c) return
// channel c's functions, with its constants copied in). In the samples order (see
// samples_order), tasks own runs of samples. Else tasks own blocks of channels (the map
// reads a block again from cache, right after its sums); with fewer channels than threads,
// each channel's samples are split across tasks instead. kMap = false: the sums and
// `finish` only (the statistics alone).
template <typename acc_t, bool kMap = true, typename scalar_t, typename Term, typename Finish,
          typename Map>
void planes_two_pass(const Layout& g, const scalar_t* a, const scalar_t* b, Term term,
                     Finish finish, scalar_t* out, Map map, bool stream) {
  if (samples_order(g, sizeof(scalar_t), b == nullptr ? 1 : 2)) {
    const int64_t tasks = std::max<int64_t>(
        1, std::min({int64_t(at::get_num_threads()), g.N, g.M * g.C / kParallelWork}));
    // task t's samples: [first(t), first(t + 1))
    auto first = [&](int64_t t) { return g.N * t / tasks; };
    std::vector<double> p1(tasks * g.C, 0.0), p2(tasks * g.C, 0.0);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        block_sums<acc_t>(g, 0, g.C, first(t), first(t + 1), a, b, term, &p1[t * g.C],
                          &p2[t * g.C], /*prefetch=*/false);
      }
    });
    for (int64_t c = 0; c < g.C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t t = 0; t < tasks; ++t) {
        s1 += p1[t * g.C + c];
        s2 += p2[t * g.C + c];
      }
      finish(c, s1, s2);
    }
    if constexpr (kMap) {
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          block_map<acc_t>(g, 0, g.C, first(t), first(t + 1), a, b, out, map, stream,
                           /*prefetch=*/false);
        }
      });
    }
    return;
  }
  const int64_t parts = plane_parts(g);
  if (parts == 1) {
    const int64_t cb = block_channels(g, sizeof(scalar_t));
    const int64_t blocks = (g.C + cb - 1) / cb;
    at::parallel_for(0, blocks, grain_for(blocks, g.M * cb), [&](int64_t b0, int64_t b1) {
      std::vector<double> s1(cb), s2(cb);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * cb, c1 = std::min(g.C, c0 + cb);
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        block_sums<acc_t>(g, c0, c1, 0, g.N, a, b, term, s1.data(), s2.data());
        for (int64_t c = c0; c < c1; ++c) finish(c, s1[c - c0], s2[c - c0]);
        if constexpr (kMap) block_map<acc_t>(g, c0, c1, 0, g.N, a, b, out, map, stream);
      }
    });
    return;
  }
  for (int64_t c = 0; c < g.C; ++c) {
    std::vector<double> p1(parts, 0.0), p2(parts, 0.0);
    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        block_sums<acc_t>(g, c, c + 1, g.N * t / parts, g.N * (t + 1) / parts, a, b, term,
                          &p1[t], &p2[t]);
      }
    });
    double s1 = 0, s2 = 0;
    for (int64_t t = 0; t < parts; ++t) {
      s1 += p1[t];
      s2 += p2[t];
    }
    finish(c, s1, s2);
    if constexpr (!kMap) continue;
    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        block_map<acc_t>(g, c, c + 1, g.N * t / parts, g.N * (t + 1) / parts, a, b, out, map,
                         stream);
      }
    });
  }
}

// ---------------------------------------------------------------- rows (M, C)

// Per-channel sums over rows [m0, m1) of (M, C) arrays a and b (b = nullptr: a again):
// `term(a, b, at, u, v)` gives the two summands of the values of a and b, at(k) being the
// channel's value of a per-channel array k, as vectors of kWidth channels and as scalars;
// they are added into s1 and s2.
template <typename acc_t, typename scalar_t, typename Term>
void row_sums(int64_t m0, int64_t m1, int64_t C, const scalar_t* a, const scalar_t* b,
              Term term, double* s1, double* s2) {
  using V = Vec<acc_t>;
  constexpr int W = kWidth<acc_t>;
  if (b == nullptr) b = a;
  std::vector<acc_t> a1(C), a2(C);
  for (int64_t b0 = m0; b0 < m1; b0 += kRowBlock) {
    const int64_t b1 = std::min(m1, b0 + kRowBlock);
    std::fill(a1.begin(), a1.end(), acc_t(0));
    std::fill(a2.begin(), a2.end(), acc_t(0));
    acc_t* p1 = a1.data();
    acc_t* p2 = a2.data();
    for (int64_t m = b0; m < b1; ++m) {
      const scalar_t* pa = a + m * C;
      const scalar_t* pb = b + m * C;
      int64_t c = 0;
      if constexpr (!std::is_same_v<acc_t, scalar_t>) {  // as in rows_map
        for (; c + W <= C; c += W) {
          V u, v, r1, r2;
          auto at = [c](const acc_t* k) { return load_vec<acc_t>(k + c); };
          term(load_vec<acc_t>(pa + c), load_vec<acc_t>(pb + c), at, u, v);
          std::memcpy(&r1, p1 + c, kVecBytes);
          std::memcpy(&r2, p2 + c, kVecBytes);
          r1 += u;
          r2 += v;
          std::memcpy(p1 + c, &r1, kVecBytes);
          std::memcpy(p2 + c, &r2, kVecBytes);
        }
      }
#pragma omp simd
      for (int64_t j = c; j < C; ++j) {
        acc_t u, v;
        auto at = [j](const acc_t* k) { return k[j]; };
        term(static_cast<acc_t>(pa[j]), static_cast<acc_t>(pb[j]), at, u, v);
        p1[j] += u;
        p2[j] += v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p1[c];
      s2[c] += p2[c];
    }
  }
}

// Splits [0, M) into tasks, runs `sums` on each into its own partial arrays, adds them up.
template <typename F>
void reduce_rows(const Layout& g, F sums, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, g.C));
  const int64_t tasks = std::max<int64_t>(1, std::min(threads, g.M / min_rows));
  std::vector<double> part1(tasks * g.C, 0.0), part2(tasks * g.C, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = g.M * t / tasks, m1 = g.M * (t + 1) / tasks;
      sums(m0, m1, part1.data() + t * g.C, part2.data() + t * g.C);
    }
  });
  s1.assign(g.C, 0.0);
  s2.assign(g.C, 0.0);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < g.C; ++c) {
      s1[c] += part1[t * g.C + c];
      s2[c] += part2[t * g.C + c];
    }
  }
}

template <typename F>
void for_rows(const Layout& g, F body) {
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, g.C));
  at::parallel_for(0, g.M, grain, [&](int64_t m0, int64_t m1) { body(m0, m1); });
}

// out[m, c] = map(a, b, at) over (M, C) rows, where a and b are the values of `a` and `b`
// (b = nullptr: a again) at (m, c), in the compute type, and at(k) is channel c's value of a
// per-channel array k. Element loops for float and double, which the compiler vectorises
// (a row's channel constants differ from lane to lane: they are loaded as the values are),
// vectors for float16 and bfloat16, converted a register at a time.
template <typename acc_t, typename scalar_t, typename Map>
void rows_map(const Layout& g, const scalar_t* a, const scalar_t* b, scalar_t* out, Map map) {
  constexpr int W = kWidth<acc_t>;
  constexpr bool kConverts = !std::is_same_v<acc_t, scalar_t>;
  if (b == nullptr) b = a;
  for_rows(g, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t off = m * g.C;
      int64_t c = 0;
      if constexpr (kConverts) {
        for (; c + W <= g.C; c += W) {
          auto at = [c](const acc_t* k) { return load_vec<acc_t>(k + c); };
          store_vec<acc_t>(out + off + c,
                           map(load_vec<acc_t>(a + off + c), load_vec<acc_t>(b + off + c), at));
        }
      }
#pragma omp simd
      for (int64_t j = c; j < g.C; ++j) {
        auto at = [j](const acc_t* k) { return k[j]; };
        out[off + j] = static_cast<scalar_t>(
            map(static_cast<acc_t>(a[off + j]), static_cast<acc_t>(b[off + j]), at));
      }
    }
  });
}

// out = (x - mean) * scale + shift per channel (then the ReLU with kRelu): the forward's
// second pass and the eval forward. In planes, block_map's map (channel c's function, its
// constants read when block_map asks for it: after the sums' `finish` has written them);
// over (M, C) rows, rows_affine.
template <bool kRelu, typename acc_t>
auto planes_affine(const acc_t* mean, const acc_t* scale, const acc_t* shift) {
  return [=](int64_t c) {
    return [m = mean[c], k = scale[c], h = shift[c]](auto xv, auto) {
      return activate<kRelu>((xv - m) * k + h);
    };
  };
}

template <bool kRelu, typename scalar_t, typename acc_t>
void rows_affine(const Layout& g, const scalar_t* x, scalar_t* out, const acc_t* mean,
                 const acc_t* scale, const acc_t* shift) {
  rows_map<acc_t>(g, x, static_cast<const scalar_t*>(nullptr), out, [&](auto xv, auto, auto at) {
    return activate<kRelu>((xv - at(mean)) * at(scale) + at(shift));
  });
}

// ---------------------------------------------------------------- forward (training)

// kOutput = false: the statistics alone (batch_norm_stats), y is not written. `exact`, where
// given (2C values): the mean and the biased variance in float64 too, before they are rounded
// to the statistics' dtype (synchronized BatchNorm's table).
template <typename scalar_t, bool kRelu, bool kOutput = true>
void forward_impl(const Layout& g, at::Tensor& y, at::Tensor& mean_t, at::Tensor& invstd_t,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                  double eps, double* exact = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = g.x.data_ptr<scalar_t>();
  scalar_t* out = kOutput ? y.data_ptr<scalar_t>() : nullptr;
  acc_t* mean = mean_t.data_ptr<acc_t>();
  acc_t* invstd = invstd_t.data_ptr<acc_t>();
  const auto w = per_channel<acc_t>(weight, g.C, acc_t(1));
  const auto b = per_channel<acc_t>(bias, g.C, acc_t(0));
  const double count = static_cast<double>(g.M);

  auto finish = [&](int64_t c, acc_t shift, double s1, double s2) {
    const double m1 = s1 / count;
    double var = s2 / count - m1 * m1;
    if (var < 0.0) var = 0.0;  // rounding; a NaN (from an infinite value) stays, as torch's
    mean[c] = static_cast<acc_t>(shift + m1);
    invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    if (exact != nullptr) {
      exact[c] = static_cast<double>(shift) + m1;
      exact[g.C + c] = var;
    }
  };

  if (g.rows) {
    std::vector<acc_t> shift(g.C);
    for (int64_t c = 0; c < g.C; ++c) shift[c] = shift_of(static_cast<acc_t>(x[c]));
    const acc_t* sh = shift.data();
    std::vector<double> s1, s2;
    reduce_rows(g, [&](int64_t m0, int64_t m1, double* p1, double* p2) {
      auto moments = [sh](auto xv, auto, auto at, auto& u, auto& v) {
        const auto d = xv - at(sh);
        u = d;
        v = d * d;
      };
      row_sums<acc_t>(m0, m1, g.C, x, static_cast<const scalar_t*>(nullptr), moments, p1, p2);
    }, s1, s2);
    std::vector<acc_t> scale(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      finish(c, shift[c], s1[c], s2[c]);
      scale[c] = invstd[c] * w[c];
    }
    if constexpr (kOutput) rows_affine<kRelu>(g, x, out, mean, scale.data(), b.data());
    return;
  }

  std::vector<acc_t> shift(g.C), scale(g.C);
  for (int64_t c = 0; c < g.C; ++c) shift[c] = shift_of(static_cast<acc_t>(x[c * g.L]));
  // channel c's term (see planes_two_pass)
  auto moments = [&](int64_t c) {
    return [s = shift[c]](auto xv, auto, auto& u, auto& v) {
      const auto d = xv - s;
      u = d;
      v = d * d;
    };
  };
  auto affine = planes_affine<kRelu>(mean, scale.data(), b.data());
  // A block's statistics, then at once its normalisation, while it is in cache.
  planes_two_pass<acc_t, kOutput>(
      g, x, static_cast<const scalar_t*>(nullptr), moments,
      [&](int64_t c, double s1, double s2) {
        finish(c, shift[c], s1, s2);
        scale[c] = invstd[c] * w[c];
      },
      out, affine, kOutput && streams(y, g));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  check_affine(input, weight, bias);
  const Layout g = layout_of(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  auto y = empty_as(g.x);
  auto mean = empty_channels(g.C, acc);
  auto invstd = empty_channels(g.C, acc);
  if (g.M == 0) return {y, mean.fill_(NAN), invstd.fill_(NAN)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_train", [&] {
    if (relu) {
      forward_impl<scalar_t, true>(g, y, mean, invstd, weight, bias, eps);
    } else {
      forward_impl<scalar_t, false>(g, y, mean, invstd, weight, bias, eps);
    }
  });
  return {y, mean, invstd};
}

// The batch's statistics alone, (mean, invstd), exactly as forward_train computes them:
// for variants that need them before they normalise (batch renormalization's r and d).
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input, double eps) {
  const Layout g = layout_of(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  auto mean = empty_channels(g.C, acc);
  auto invstd = empty_channels(g.C, acc);
  if (g.M == 0) return {mean.fill_(NAN), invstd.fill_(NAN)};
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_stats", [&] {
    forward_impl<scalar_t, false, false>(g, none, mean, invstd, c10::nullopt, c10::nullopt, eps);
  });
  return {mean, invstd};
}

// ---------------------------------------------------------------- synchronized statistics
//
// Synchronized BatchNorm's statistics in two operators around its all_reduce (docs/kernel.md,
// "Synchronized BatchNorm"): each process's table of `parts` rows of (count, mean, M2), zero
// but for its own `part`, whose sum over the processes is every row (adding zeros rounds
// nothing); then every process merges the same rows in the same order (Chan et al.), so the
// group's statistics are the same bits on all of them. One call each, not the forty-odd
// small tensor operations they were in Python (benchmarks/README.md).

// The local part's row: its count, and its mean and M2 in float64 as the forward computes
// them, before they are rounded to the statistics' dtype (a float32 mean of 1e4 would be
// off by a thousandth, which its spread around the whole mean would square).
at::Tensor stats_table(const at::Tensor& input, int64_t parts, int64_t part) {
  TORCH_CHECK(parts >= 1 && part >= 0 && part < parts,
              "part must be one of the parts' rows, 0 to parts - 1, got part ", part, " of ",
              parts);
  const Layout g = layout_of(input);
  const int64_t width = 1 + 2 * g.C;
  at::Tensor table = at::detail::empty_cpu({parts, width}, at::kDouble);
  double* out = table.data_ptr<double>();
  std::fill(out, out + parts * width, 0.0);
  if (g.M == 0) return table;  // no values: a row of zeros, which adds nothing
  const auto acc = at::toOpMathType(input.scalar_type());
  auto mean = empty_channels(g.C, acc);
  auto invstd = empty_channels(g.C, acc);
  at::Tensor none;
  double* row = out + part * width;
  // (eps 1: the invstd it gives is not used)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "stats_table", [&] {
    forward_impl<scalar_t, false, false>(g, none, mean, invstd, c10::nullopt, c10::nullopt, 1.0,
                                         row + 1);
  });
  const double count = static_cast<double>(g.M);
  row[0] = count;
  for (int64_t c = 0; c < g.C; ++c) row[1 + g.C + c] *= count;  // M2 = var * count
  return table;
}

// The rows merged: (mean, var, invstd) in `dtype` (the statistics' accumulation dtype), and
// the total count (an int64 scalar); NaN statistics and count 0 where no row has values.
// Computed in float64 from the rows in order: the mean weighted by the counts, then M2 as
// the parts' M2 plus each part's count times its mean's squared deviation from the whole
// mean (taken directly: no difference of squares).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_stats(const at::Tensor& table,
                                                                       double eps,
                                                                       at::ScalarType dtype) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= 1 && table.size(1) >= 3 &&
                  table.size(1) % 2 == 1,
              "table must be (parts, 1 + 2C) with C >= 1, got ", table.sizes());
  check_device(&table);
  TORCH_CHECK(table.scalar_type() == at::kDouble, "expected scalar type ", at::kDouble,
              " but found ", table.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "the statistics' dtype must be Float or Double, got ", dtype);
  const at::Tensor t = table.contiguous();
  const int64_t parts = t.size(0), width = t.size(1), C = (width - 1) / 2;
  const double* p = t.const_data_ptr<double>();
  auto mean_t = empty_channels(C, dtype);
  auto var_t = empty_channels(C, dtype);
  auto invstd_t = empty_channels(C, dtype);
  double total = 0.0;
  for (int64_t r = 0; r < parts; ++r) total += p[r * width];
  at::Tensor count_t = at::detail::empty_cpu(c10::IntArrayRef{}, at::kLong);
  *count_t.data_ptr<int64_t>() = static_cast<int64_t>(total);
  AT_DISPATCH_FLOATING_TYPES(dtype, "merge_stats", [&] {
    scalar_t* mean = mean_t.data_ptr<scalar_t>();
    scalar_t* var = var_t.data_ptr<scalar_t>();
    scalar_t* invstd = invstd_t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      if (total == 0.0) {
        mean[c] = var[c] = invstd[c] = static_cast<scalar_t>(NAN);
        continue;
      }
      double weighted = 0.0;
      for (int64_t r = 0; r < parts; ++r) weighted += p[r * width] * p[r * width + 1 + c];
      const double merged = weighted / total;
      double m2 = 0.0, spread = 0.0;
      for (int64_t r = 0; r < parts; ++r) {
        const double* row = p + r * width;
        m2 += row[1 + C + c];
        const double d = row[1 + c] - merged;
        spread += row[0] * (d * d);
      }
      const double v = (m2 + spread) / total;
      mean[c] = static_cast<scalar_t>(merged);
      var[c] = static_cast<scalar_t>(v);
      invstd[c] = static_cast<scalar_t>(1.0 / std::sqrt(v + eps));
    }
  });
  return {mean_t, var_t, invstd_t, count_t};
}

// ---------------------------------------------------------------- backward

// With kRelu, dy is first masked where the forward's ReLU was off: the forward's
// pre-activation z = (x - mean) * invstd * weight + bias is recomputed by the same
// expression (no extra tensor read), and the masked gradient enters every sum and dx.
template <typename scalar_t, bool kRelu>
void backward_impl(const Layout& g, const at::Tensor& dy_t, at::Tensor& dx_t,
                   at::Tensor& dweight_t, at::Tensor& dbias_t,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& mean_t, const at::Tensor& invstd_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = g.x.data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.data_ptr<scalar_t>();
  scalar_t* dx = dx_t.data_ptr<scalar_t>();
  acc_t* dweight = dweight_t.data_ptr<acc_t>();
  acc_t* dbias = dbias_t.data_ptr<acc_t>();
  const auto w = per_channel<acc_t>(weight, g.C, acc_t(1));
  const auto mean = per_channel<acc_t>(mean_t, g.C, acc_t(0));
  const auto invstd = per_channel<acc_t>(invstd_t, g.C, acc_t(1));
  const auto b = kRelu ? per_channel<acc_t>(bias, g.C, acc_t(0)) : std::vector<acc_t>();
  std::vector<acc_t> scale(kRelu ? g.C : 0);  // the forward's: invstd * weight
  for (size_t c = 0; c < scale.size(); ++c) scale[c] = invstd[c] * w[c];
  const double count = static_cast<double>(g.M);

  // From the sums: dweight, dbias and the three coefficients of dx.
  auto coefficients = [&](int64_t c, double sum_dy, double sum_dy_xmu, acc_t& k1, acc_t& k2,
                          acc_t& k3) {
    const double is = invstd[c];
    dweight[c] = static_cast<acc_t>(sum_dy_xmu * is);
    dbias[c] = static_cast<acc_t>(sum_dy);
    const double a = is * w[c];
    k1 = static_cast<acc_t>(a);
    k2 = static_cast<acc_t>(-a * is * is * sum_dy_xmu / count);
    k3 = static_cast<acc_t>(-a * sum_dy / count);
  };

  if (g.rows) {
    const acc_t* mu = mean.data();
    const acc_t *sc = scale.data(), *sh = b.data();
    // dy, or dy masked by the forward's ReLU
    auto grad = [mu, sc, sh](auto dyv, auto xv, auto at) {
      if constexpr (kRelu) {
        return relu_grad(dyv, (xv - at(mu)) * at(sc) + at(sh));
      } else {
        return dyv;
      }
    };
    std::vector<double> s1, s2;
    reduce_rows(g, [&](int64_t m0, int64_t m1, double* p1, double* p2) {
      auto grad_sums = [mu, grad](auto dyv, auto xv, auto at, auto& u, auto& v) {
        const auto d = grad(dyv, xv, at);
        u = d;
        v = d * (xv - at(mu));
      };
      row_sums<acc_t>(m0, m1, g.C, dy, x, grad_sums, p1, p2);
    }, s1, s2);
    std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
    for (int64_t c = 0; c < g.C; ++c) coefficients(c, s1[c], s2[c], k1[c], k2[c], k3[c]);
    const acc_t *a = k1.data(), *bq = k2.data(), *cq = k3.data();
    rows_map<acc_t>(g, dy, x, dx, [&](auto dyv, auto xv, auto at) {
      return grad(dyv, xv, at) * at(a) + (xv - at(mu)) * at(bq) + at(cq);
    });
    return;
  }

  std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
  // channel c's dy, or dy masked by the forward's ReLU; its term and its map
  auto grad = [&](int64_t c) {
    return [m = mean[c], k = kRelu ? scale[c] : acc_t(0), h = kRelu ? b[c] : acc_t(0)](
               auto dyv, auto xv) {
      if constexpr (kRelu) {
        return relu_grad(dyv, (xv - m) * k + h);
      } else {
        return dyv;
      }
    };
  };
  auto grad_sums = [&](int64_t c) {
    return [gc = grad(c), m = mean[c]](auto dyv, auto xv, auto& u, auto& v) {
      const auto d = gc(dyv, xv);
      u = d;
      v = d * (xv - m);
    };
  };
  auto grad_input = [&](int64_t c) {
    return [gc = grad(c), m = mean[c], q1 = k1[c], q2 = k2[c], q3 = k3[c]](auto dyv, auto xv) {
      return gc(dyv, xv) * q1 + (xv - m) * q2 + q3;
    };
  };
  planes_two_pass<acc_t>(
      g, dy, x, grad_sums,
      [&](int64_t c, double s1, double s2) { coefficients(c, s1, s2, k1[c], k2[c], k3[c]); },
      dx, grad_input, streams(dx_t, g));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu) {
  check_affine(input, weight, bias);
  const int64_t C = input.size(1);
  check_statistic(mean, "mean", C);
  check_statistic(invstd, "invstd", C);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out should have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  check_device(&grad_out);
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "expected scalar type ",
              input.scalar_type(), " but found ", grad_out.scalar_type());
  const Layout g = layout_of(input);
  // dy in the same layout as x, so one index serves both
  at::Tensor dy = g.rows && g.x.dim() >= 4 && !g.x.is_contiguous()
                      ? grad_out.contiguous(g.x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::ChannelsLast3d)
                      : grad_out.contiguous();
  const auto acc = at::toOpMathType(input.scalar_type());
  auto dx = empty_as(g.x);
  // Every channel's dweight and dbias are written below (no zero fill: each op costs
  // microseconds when the caches are cold, as they are after a large layer).
  auto dweight = empty_channels(g.C, acc);
  auto dbias = empty_channels(g.C, acc);
  if (g.M == 0) return {dx, dweight.zero_(), dbias.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "backward", [&] {
    if (relu) {
      backward_impl<scalar_t, true>(g, dy, dx, dweight, dbias, weight, bias, mean, invstd);
    } else {
      backward_impl<scalar_t, false>(g, dy, dx, dweight, dbias, weight, bias, mean, invstd);
    }
  });
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------- the backward in two halves
//
// Synchronized BatchNorm (normbench/distributed.py) needs the backward's two per-channel sums
// of every process before any process can write dx: batch_norm_backward_reduce is the
// backward's first pass alone (its sums, as dweight = sum(g * xhat) and dbias = sum(g), g the
// gradient masked by the fused ReLU), batch_norm_backward_apply its second pass alone, from
// sums and a count given (those of the whole synchronized group). Reduce then apply with the
// local sums is the backward.

template <typename scalar_t, bool kRelu>
void backward_reduce_impl(const Layout& g, const at::Tensor& dy_t, at::Tensor& dweight_t,
                          at::Tensor& dbias_t, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t,
                          const at::Tensor& invstd_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = g.x.data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.data_ptr<scalar_t>();
  acc_t* dweight = dweight_t.data_ptr<acc_t>();
  acc_t* dbias = dbias_t.data_ptr<acc_t>();
  const auto w = per_channel<acc_t>(weight, g.C, acc_t(1));
  const auto mean = per_channel<acc_t>(mean_t, g.C, acc_t(0));
  const auto invstd = per_channel<acc_t>(invstd_t, g.C, acc_t(1));
  const auto b = kRelu ? per_channel<acc_t>(bias, g.C, acc_t(0)) : std::vector<acc_t>();
  std::vector<acc_t> scale(kRelu ? g.C : 0);
  for (size_t c = 0; c < scale.size(); ++c) scale[c] = invstd[c] * w[c];
  auto finish = [&](int64_t c, double sum_dy, double sum_dy_xmu) {
    dweight[c] = static_cast<acc_t>(sum_dy_xmu * static_cast<double>(invstd[c]));
    dbias[c] = static_cast<acc_t>(sum_dy);
  };
  if (g.rows) {
    const acc_t* mu = mean.data();
    const acc_t *sc = scale.data(), *sh = b.data();
    std::vector<double> s1, s2;
    reduce_rows(g, [&](int64_t m0, int64_t m1, double* p1, double* p2) {
      auto grad_sums = [mu, sc, sh](auto dyv, auto xv, auto at, auto& u, auto& v) {
        if constexpr (kRelu) {
          u = relu_grad(dyv, (xv - at(mu)) * at(sc) + at(sh));
        } else {
          u = dyv;
        }
        v = u * (xv - at(mu));
      };
      row_sums<acc_t>(m0, m1, g.C, dy, x, grad_sums, p1, p2);
    }, s1, s2);
    for (int64_t c = 0; c < g.C; ++c) finish(c, s1[c], s2[c]);
    return;
  }
  auto grad_sums = [&](int64_t c) {
    return [m = mean[c], k = kRelu ? scale[c] : acc_t(0), h = kRelu ? b[c] : acc_t(0)](
               auto dyv, auto xv, auto& u, auto& v) {
      if constexpr (kRelu) {
        u = relu_grad(dyv, (xv - m) * k + h);
      } else {
        u = dyv;
      }
      v = u * (xv - m);
    };
  };
  auto unused = [](int64_t) { return [](auto a, auto) { return a; }; };
  planes_two_pass<acc_t, false>(g, dy, x, grad_sums, finish, static_cast<scalar_t*>(nullptr),
                                unused, false);
}

template <typename scalar_t, bool kRelu>
void backward_apply_impl(const Layout& g, const at::Tensor& dy_t, at::Tensor& dx_t,
                         const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& mean_t,
                         const at::Tensor& invstd_t, const at::Tensor& sum_dy_t,
                         const at::Tensor& sum_dy_xhat_t, double count) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = g.x.data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.data_ptr<scalar_t>();
  scalar_t* dx = dx_t.data_ptr<scalar_t>();
  const auto w = per_channel<acc_t>(weight, g.C, acc_t(1));
  const auto mean = per_channel<acc_t>(mean_t, g.C, acc_t(0));
  const auto invstd = per_channel<acc_t>(invstd_t, g.C, acc_t(1));
  const auto sum_dy = per_channel<double>(sum_dy_t, g.C, 0.0);
  const auto sum_dy_xhat = per_channel<double>(sum_dy_xhat_t, g.C, 0.0);
  const auto b = kRelu ? per_channel<acc_t>(bias, g.C, acc_t(0)) : std::vector<acc_t>();
  std::vector<acc_t> scale(kRelu ? g.C : 0);
  for (size_t c = 0; c < scale.size(); ++c) scale[c] = invstd[c] * w[c];
  // dx = invstd * w * (g - sum_dy / count - xhat * sum_dy_xhat / count), as k1 g + k2 (x - mean) + k3
  std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double is = invstd[c];
    const double a = is * w[c];
    k1[c] = static_cast<acc_t>(a);
    k2[c] = static_cast<acc_t>(-a * is * sum_dy_xhat[c] / count);
    k3[c] = static_cast<acc_t>(-a * sum_dy[c] / count);
  }
  if (g.rows) {
    const acc_t *mu = mean.data(), *sc = scale.data(), *sh = b.data();
    const acc_t *a = k1.data(), *bq = k2.data(), *cq = k3.data();
    rows_map<acc_t>(g, dy, x, dx, [&](auto dyv, auto xv, auto at) {
      auto gv = dyv;
      if constexpr (kRelu) gv = relu_grad(dyv, (xv - at(mu)) * at(sc) + at(sh));
      return gv * at(a) + (xv - at(mu)) * at(bq) + at(cq);
    });
    return;
  }
  auto grad_input = [&](int64_t c) {
    return [m = mean[c], k = kRelu ? scale[c] : acc_t(0), h = kRelu ? b[c] : acc_t(0),
            q1 = k1[c], q2 = k2[c], q3 = k3[c]](auto dyv, auto xv) {
      auto gv = dyv;
      if constexpr (kRelu) gv = relu_grad(dyv, (xv - m) * k + h);
      return gv * q1 + (xv - m) * q2 + q3;
    };
  };
  const bool stream = streams(dx_t, g);
  const int64_t cb = block_channels(g, sizeof(scalar_t));
  const int64_t blocks = (g.C + cb - 1) / cb;
  at::parallel_for(0, blocks, grain_for(blocks, g.M * cb), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * cb;
      block_map<acc_t>(g, c0, std::min(g.C, c0 + cb), 0, g.N, dy, x, dx, grad_input, stream);
    }
  });
}

// dy in the same layout as x, so one index serves both; the backward's checks.
at::Tensor checked_grad(const at::Tensor& grad_out, const at::Tensor& input, const Layout& g) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out should have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  check_device(&grad_out);
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "expected scalar type ",
              input.scalar_type(), " but found ", grad_out.scalar_type());
  return g.rows && g.x.dim() >= 4 && !g.x.is_contiguous()
             ? grad_out.contiguous(g.x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::ChannelsLast3d)
             : grad_out.contiguous();
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu) {
  check_affine(input, weight, bias);
  const int64_t C = input.size(1);
  check_statistic(mean, "mean", C);
  check_statistic(invstd, "invstd", C);
  const Layout g = layout_of(input);
  at::Tensor dy = checked_grad(grad_out, input, g);
  const auto acc = at::toOpMathType(input.scalar_type());
  auto dweight = empty_channels(g.C, acc);
  auto dbias = empty_channels(g.C, acc);
  if (g.M == 0) return {dweight.zero_(), dbias.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "backward_reduce", [&] {
    if (relu) {
      backward_reduce_impl<scalar_t, true>(g, dy, dweight, dbias, weight, bias, mean, invstd);
    } else {
      backward_reduce_impl<scalar_t, false>(g, dy, dweight, dbias, weight, bias, mean, invstd);
    }
  });
  return {dweight, dbias};
}

at::Tensor backward_apply(const at::Tensor& grad_out, const at::Tensor& input,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xhat, int64_t count, bool relu) {
  check_affine(input, weight, bias);
  const int64_t C = input.size(1);
  check_statistic(mean, "mean", C);
  check_statistic(invstd, "invstd", C);
  check_statistic(sum_dy, "sum_dy", C);
  check_statistic(sum_dy_xhat, "sum_dy_xhat", C);
  TORCH_CHECK(count > 0, "count must be positive, got ", count);
  const Layout g = layout_of(input);
  at::Tensor dy = checked_grad(grad_out, input, g);
  auto dx = empty_as(g.x);
  if (g.M == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "backward_apply", [&] {
    if (relu) {
      backward_apply_impl<scalar_t, true>(g, dy, dx, weight, bias, mean, invstd, sum_dy,
                                          sum_dy_xhat, static_cast<double>(count));
    } else {
      backward_apply_impl<scalar_t, false>(g, dy, dx, weight, bias, mean, invstd, sum_dy,
                                           sum_dy_xhat, static_cast<double>(count));
    }
  });
  return dx;
}

// ---------------------------------------------------------------- eval and running statistics

template <typename scalar_t, bool kRelu>
void eval_impl(const Layout& g, at::Tensor& y, const at::Tensor& running_mean,
               const at::Tensor& running_var, const c10::optional<at::Tensor>& weight,
               const c10::optional<at::Tensor>& bias, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = g.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const auto w = per_channel<acc_t>(weight, g.C, acc_t(1));
  auto b = per_channel<acc_t>(bias, g.C, acc_t(0));
  auto mean = per_channel<acc_t>(running_mean, g.C, acc_t(0));
  const auto var = per_channel<acc_t>(running_var, g.C, acc_t(1));
  std::vector<acc_t> scale(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    scale[c] = static_cast<acc_t>(w[c] / std::sqrt(static_cast<double>(var[c]) + eps));
    if (!std::isfinite(scale[c])) {
      // A zero variance with eps = 0 (or an infinite weight): torch computes
      // x * scale + (bias - mean * scale), and so gives its NaNs and infinities.
      b[c] = b[c] - mean[c] * scale[c];
      mean[c] = acc_t(0);
    }
  }
  if (g.rows) {
    rows_affine<kRelu>(g, x, out, mean.data(), scale.data(), b.data());
    return;
  }
  auto affine = planes_affine<kRelu>(mean.data(), scale.data(), b.data());
  const bool stream = streams(y, g);
  const int64_t cb = block_channels(g, sizeof(scalar_t));
  const int64_t blocks = (g.C + cb - 1) / cb;
  at::parallel_for(0, blocks, grain_for(blocks, g.M * cb), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * cb;
      block_map<acc_t>(g, c0, std::min(g.C, c0 + cb), 0, g.N, x, x, out, affine, stream);
    }
  });
}

at::Tensor forward_eval(const at::Tensor& input, const at::Tensor& running_mean,
                        const at::Tensor& running_var, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  check_eval(input, running_mean, running_var, weight, bias);
  const Layout g = layout_of(input);
  auto y = empty_as(g.x);
  if (g.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_eval", [&] {
    if (relu) {
      eval_impl<scalar_t, true>(g, y, running_mean, running_var, weight, bias, eps);
    } else {
      eval_impl<scalar_t, false>(g, y, running_mean, running_var, weight, bias, eps);
    }
  });
  return y;
}

// running = (1 - momentum) * running + momentum * batch, the variance unbiased (count / (count - 1));
// the running statistics written through their stride (checked: 1-d, no two values in one place).
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  const int64_t C = mean.numel();
  const auto m = per_channel<double>(mean, C, 0.0);
  const auto is = per_channel<double>(invstd, C, 1.0);
  const double unbias = count > 1 ? static_cast<double>(count) / (count - 1) : 1.0;
  auto update = [&](at::Tensor& running, auto batch_value) {
    if (!running.defined()) return;
    TORCH_CHECK(running.dim() == 1 && running.numel() == C, "running statistics must be (C,)");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update", [&] {
      scalar_t* r = running.data_ptr<scalar_t>();
      const int64_t stride = running.stride(0);
      for (int64_t c = 0; c < C; ++c) {
        scalar_t& value = r[c * stride];
        value = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(value) +
                                      momentum * batch_value(c));
      }
    });
  };
  update(running_mean, [&](int64_t c) { return m[c]; });
  update(running_var, [&](int64_t c) { return (1.0 / (is[c] * is[c]) - eps) * unbias; });
}

// ---------------------------------------------------------------- the operators
//
// One schema per operator, defined here; the CPU kernels above are their CPU
// implementations, the Triton kernels (normbench/kernels/triton_kernels.py) their CUDA ones,
// registered from Python, and so are their fake (meta) implementations, for torch.compile.
// Autograd is registered once, below, for every device: its nodes call the forward's and
// the backward's operators through the dispatcher, which picks the device's kernel.

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  static auto op = op_handle("normbench::batch_norm_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, double, bool)>();
  return op.call(x, weight, bias, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu) {
  static auto op = op_handle("normbench::batch_norm_backward")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           bool)>();
  return op.call(grad_out, x, weight, bias, mean, invstd, relu);
}

at::Tensor call_eval(const at::Tensor& x, const at::Tensor& running_mean,
                     const at::Tensor& running_var, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  static auto op = op_handle("normbench::batch_norm_eval")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, double, bool)>();
  return op.call(x, running_mean, running_var, weight, bias, eps, relu);
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// A parameter's gradient from the kernels ((C,), in the compute type) in the parameter's
// dtype and shape: torch takes a (1, C) weight, whose gradient is (1, C). (Symbolic sizes
// too: torch.compile traces the backward with them.)
at::Tensor grad_as(const at::Tensor& grad, at::ScalarType dtype, const at::Tensor& param) {
  at::Tensor out = grad.scalar_type() == dtype ? grad : grad.to(dtype);
  return param.defined() && param.dim() != 1 ? out.reshape_symint(param.sym_sizes()) : out;
}

// The bias, where the backward needs it: for the fused ReLU's mask, or for its gradient's
// shape where it is not (C,).
at::Tensor bias_to_save(const c10::optional<at::Tensor>& bias, bool relu) {
  const bool needed = bias.has_value() && bias->defined() && (relu || bias->dim() != 1);
  return needed ? *bias : at::Tensor();
}

// Grad mode is on in a backward only for create_graph=True: the kernels' backward is not
// itself differentiable, so refuse rather than return wrong second derivatives.
void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "normbench's BatchNorm does not support double backward (create_graph=True); "
              "torch's nn.BatchNorm does (norm=torch_bn)");
}

// Training: y (differentiable) and the batch's mean and invstd (not).
struct ForwardFunction : public torch::autograd::Function<ForwardFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, double eps,
                                                bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, invstd] = call_forward(x, weight, bias, eps, relu);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias_to_save(bias, relu), mean,
                            invstd});
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined()
                                        ? static_cast<int64_t>(bias->scalar_type())
                                        : int64_t(-1);
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, invstd});
    // No zero gradients made for mean and invstd (backward reads only y's): two fewer
    // operator calls per step, each microseconds with the caches cold after the kernel.
    ctx->set_materialize_grads(false);
    return {y, mean, invstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_double_backward();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const at::Tensor &mean = saved[3], &invstd = saved[4];
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // Straight to the device's kernel: the backward is not differentiated (refused above),
    // and the autograd fallback's checks cost as much as a small layer's arithmetic.
    at::AutoDispatchBelowADInplaceOrView below;
    auto [dx, dweight, dbias] = call_backward(grad_y, x, optional_of(weight), optional_of(bias),
                                              mean, invstd, ctx->saved_data["relu"].toBool());
    return {dx, weight.defined() ? grad_as(dweight, weight.scalar_type(), weight) : at::Tensor(),
            bias_dtype >= 0 ? grad_as(dbias, static_cast<at::ScalarType>(bias_dtype), bias)
                            : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// Eval: differentiable in x, weight and bias (fine-tuning through frozen statistics, which
// is rare: the backward is plain tensor operations, on any device).
struct EvalFunction : public torch::autograd::Function<EvalFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x, const at::Tensor& running_mean,
                                                const at::Tensor& running_var,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, double eps,
                                                bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor y = call_eval(x, running_mean, running_var, weight, bias, eps, relu);
    ctx->save_for_backward({x, running_mean, running_var, weight.value_or(at::Tensor()),
                            relu ? y : at::Tensor(), bias_to_save(bias, /*relu=*/false)});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    refuse_double_backward();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &running_mean = saved[1], &running_var = saved[2];
    const at::Tensor &weight = saved[3], &y = saved[4], &bias = saved[5];
    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // through the ReLU, as threshold_backward: no gradient where y <= 0 (a NaN y passes it)
    if (y.defined()) grad_y = grad_y.masked_fill(y <= 0, 0);
    const int64_t C = x.size(1);
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = C;
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    const double eps = ctx->saved_data["eps"].toDouble();
    // in float32 for bfloat16 and float16 gradients, as torch's eval backward computes them
    // (its products and sums rounded to bfloat16 were off by about bfloat16's epsilon)
    const auto acc = at::toOpMathType(grad_y.scalar_type());
    grad_y = grad_y.to(acc);
    const at::Tensor invstd = at::rsqrt(running_var.to(at::kDouble) + eps).to(acc);
    const at::Tensor scale = weight.defined() ? invstd * weight.reshape({-1}).to(acc) : invstd;
    at::Tensor dx, dweight, dbias;
    if (ctx->needs_input_grad(0)) dx = (grad_y * scale.reshape(shape)).to(x.scalar_type());
    // needs_input_grad counts the tensors given: the bias is input 3 where no weight is
    const size_t bias_input = weight.defined() ? 4 : 3;
    if (weight.defined() && ctx->needs_input_grad(3)) {
      // sum(dy * (x - mean)) * invstd, scaled after the sum as torch's eval backward scales
      // it: with invstd infinite (eps 0, a running variance of 0) a per-value scale made
      // inf - inf = NaN of a sum that is +-inf in torch's
      const at::Tensor centred = x.to(acc) - running_mean.to(acc).reshape(shape);
      dweight = grad_as((grad_y * centred).sum(dims) * invstd, weight.scalar_type(), weight);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(bias_input)) {
      dbias = grad_as(grad_y.sum(dims), acc, bias);
    }
    return {dx, at::Tensor(), at::Tensor(), dweight, dbias, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  auto out = ForwardFunction::apply(x, weight, bias, eps, relu);
  return {out[0], out[1], out[2]};
}

at::Tensor eval_autograd(const at::Tensor& x, const at::Tensor& running_mean,
                         const at::Tensor& running_var, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  // torch's refusal of tracked running statistics, after its size checks (the Function's
  // forward runs without grad mode: checked here; the kernel checks the rest, and the fake
  // implementation where torch.compile traces with symbolic sizes)
  if (!x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    const int64_t C = channels_of(x);
    check_size(&running_mean, "running_mean", C);
    check_size(&running_var, "running_var", C);
    check_size(given(weight), "weight", C);
    check_size(given(bias), "bias", C);
  }
  check_untracked(running_mean, "running_mean");
  check_untracked(running_var, "running_var");
  return EvalFunction::apply(x, running_mean, running_var, weight, bias, eps, relu)[0];
}

// The running statistics are written through their data pointers, which autograd does not
// see: their version counters are bumped as an in-place operator would bump them.
// With a batch counter (torch's num_batches_tracked), it is incremented first, in the same
// call (an operator call less per layer and step), and `cumulative` makes the factor
// 1 / the new count: torch's momentum=None, a cumulative moving average.
void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                              const at::Tensor& mean, const at::Tensor& invstd, double momentum,
                              double eps, int64_t count,
                              const c10::optional<at::Tensor>& num_batches_tracked,
                              bool cumulative) {
  // Every argument checked before anything is written (see "argument checks").
  const int64_t C = mean.numel();
  check_statistic(mean, "mean", C);
  check_statistic(invstd, "invstd", C);
  TORCH_CHECK(invstd.scalar_type() == mean.scalar_type(), "expected scalar type ",
              mean.scalar_type(), " but found ", invstd.scalar_type());
  check_size(&running_mean, "running_mean", C);
  check_size(&running_var, "running_var", C);
  check_untracked(running_mean, "running_mean");
  check_untracked(running_var, "running_var");
  check_device(&running_mean);
  check_device(&running_var);
  // as torch: both running statistics of one dtype, the input's (the batch statistics' but
  // for float16 and bfloat16 input, whose statistics are float32), or float32
  const auto stat = running_mean.scalar_type();
  TORCH_CHECK(stat == mean.scalar_type() || (mean.scalar_type() == at::kFloat && reduced_float(stat)),
              "expected scalar type ", mean.scalar_type(), " but found ", stat);
  TORCH_CHECK(running_var.scalar_type() == stat, "expected scalar type ", stat, " but found ",
              running_var.scalar_type());
  check_running_layout(running_mean, "running_mean", /*written=*/true);
  check_running_layout(running_var, "running_var", /*written=*/true);
  // The batch counter: torch's module adds 1 to whatever tensor it is, and reads it as a
  // number for a cumulative average; an int64 of one value (the module's own) is
  // incremented here directly, any other (as torch takes it) by add_.
  const at::Tensor* counter_given = given(num_batches_tracked);
  if (counter_given != nullptr) {
    TORCH_CHECK(counter_given->is_cpu(), "num_batches_tracked must be on the CPU, got ",
                counter_given->device());
    TORCH_CHECK(!cumulative || counter_given->numel() == 1, "a Tensor with ",
                counter_given->numel(), " elements cannot be converted to Scalar");
  } else {
    TORCH_CHECK(!cumulative, "a cumulative average needs num_batches_tracked");
  }
  std::vector<at::Tensor> written{running_mean, running_var};
  if (counter_given != nullptr) {
    const at::Tensor& counter = *counter_given;
    double batches;
    if (counter.scalar_type() == at::kLong && counter.numel() == 1) {
      batches = static_cast<double>(++*counter.data_ptr<int64_t>());
      written.push_back(counter);
    } else {
      at::Tensor(counter).add_(1);  // raises (before anything else is written) as torch's does
      batches = cumulative ? counter.item<double>() : 0.0;
    }
    if (cumulative) momentum = 1.0 / batches;
  }
  update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count);
  for (const at::Tensor& t : written) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}


// ---------------------------------------------------------------- the ReLU and 2x2 max-pooling fused
//
// small_cnn's norm-ReLU-maxpool(2) as one layer (docs/kernel.md, "Pooling fused"): the forward
// writes the pooled output and, per output value, which of its window's four inputs it took
// (a byte; kDead where the ReLU zeroed the window's maximum), never the full-size activation;
// the backward reads that byte instead of a full-size gradient, so torch's max_pool2d_backward
// (a zero-filled full-size gradient, then a scatter) and one full-size read and write each way
// are gone. The gradient is torch's: max_pool2d(relu(z)) sends it to the window's first largest
// value (a NaN taking it as torch's does), and the ReLU passes it where that value is above 0.
// Channels_last (N, H, W, C) float and double input only, as small_cnn has it on the CPU
// (norms/batchnorm.py composes the unfused operators for everything else). Windows of 2x2,
// stride 2, floor mode: an odd last row or column is pooled by no window (but normalised and
// counted in the statistics, and given the statistics' part of the gradient).

constexpr uint8_t kDead = 255;  // the window's maximum was <= 0: its gradient is zero

// A vector's lanes' choice bytes (kWidth<T> of them) to and from the lanes' integers. With
// intrinsics where the ISA has the instruction: GCC 12 lowers __builtin_convertvector from 16
// bytes to 16 int32s one byte at a time (about 70 instructions where one does), which made
// relu_pool_backward compute-bound (benchmarks/README.md, "The choice bytes' conversion").
// (The vector types of the generic path: declared in a class template, since GCC 12 does not
// take a vector_size that depends on a function template's parameter as a vector.)
template <typename T>
struct ChoiceLanes {
  typedef uint8_t Bytes __attribute__((vector_size(kWidth<T>)));
  typedef uint16_t Halves __attribute__((vector_size(2 * kWidth<T>)));
};

template <typename T>
inline Mask<T> load_choice(const uint8_t* p) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double lanes");
  constexpr int L = kWidth<T>;
  Mask<T> m;
#if defined(__AVX512F__)
  const __m128i b = L == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                            : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m512i v = sizeof(T) == 4 ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepu8_epi64(b);
  std::memcpy(&m, &v, sizeof(m));
#elif defined(__AVX2__)
  __m128i b;
  if constexpr (L == 8) {
    b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else {
    int32_t four;
    std::memcpy(&four, p, 4);
    b = _mm_cvtsi32_si128(four);
  }
  const __m256i v = sizeof(T) == 4 ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepu8_epi64(b);
  std::memcpy(&m, &v, sizeof(m));
#else  // SSE (or another ISA): the conversion in two widening steps, which GCC vectorises
  using Bytes = typename ChoiceLanes<T>::Bytes;
  using Halves = typename ChoiceLanes<T>::Halves;
  Bytes b;
  std::memcpy(&b, p, sizeof(b));
  const Halves h = __builtin_convertvector(b, Halves);
  m = __builtin_convertvector(h, Mask<T>);
#endif
  return m;
}

// The lanes' integers (each 0-255) as kWidth<T> bytes at p.
template <typename T>
inline void store_choice(uint8_t* p, const Mask<T>& m) {
  constexpr int L = kWidth<T>;
#if defined(__AVX512F__)  // one vpmovdb / vpmovqb, as GCC gives it
  using Bytes = typename ChoiceLanes<T>::Bytes;
  const Bytes b = __builtin_convertvector(m, Bytes);
  std::memcpy(p, &b, sizeof(b));
#elif defined(__AVX2__)
  __m256i v;
  std::memcpy(&v, &m, sizeof(v));
  if constexpr (sizeof(T) == 8) {  // each int64's low half, in the low 128 bits
    v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
  }
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i b = _mm_packus_epi16(w, w);
  if constexpr (L == 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
  } else {
    const int32_t four = _mm_cvtsi128_si32(b);
    std::memcpy(p, &four, 4);
  }
#else
  using Bytes = typename ChoiceLanes<T>::Bytes;
  using Halves = typename ChoiceLanes<T>::Halves;
  const Halves h = __builtin_convertvector(m, Halves);
  const Bytes b = __builtin_convertvector(h, Bytes);
  std::memcpy(p, &b, sizeof(b));
#endif
}

// A window's four inputs, in row-major order: `top` is its row of x (W * C values), wo its
// column of windows.
template <typename T>
inline void window_inputs(const T* top, int64_t W, int64_t C, int64_t wo, const T* in[4]) {
  in[0] = top + 2 * wo * C;
  in[1] = in[0] + C;
  in[2] = in[0] + W * C;
  in[3] = in[2] + C;
}

// v rounded to the storage type S and back (bfloat16 and float16 in float vectors), in
// registers: bfloat16 by the bits (as float_to_bfloat16 rounds: to nearest even, a NaN kept
// a NaN), float16 by F16C's conversions; elsewhere through memory.
template <typename S, typename T>
inline Vec<T> rounded_to(const Vec<T>& v) {
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
    U32xW bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const U32xW r = bfloat16_rounding(bits) & 0xFFFF0000u;
    Vec<float> out;
    std::memcpy(&out, &r, sizeof(out));
    return v != v ? v : out;
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<T, float>) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    Vec<float> out;
#if defined(__AVX512F__)
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    const __m512 r = _mm512_cvtph_ps(_mm512_cvtps_ph(f, kRound));
#else
    __m256 f;
    std::memcpy(&f, &v, sizeof(f));
    const __m256 r = _mm256_cvtph_ps(_mm256_cvtps_ph(f, kRound));
#endif
    std::memcpy(&out, &r, sizeof(out));
    return out;
#endif
  } else {
    S t[kWidth<T>];
    store_vec<T>(t, v);
    return load_vec<T>(t);
  }
}

// What a window's max-pooling compares, from z in the compute type T: z itself where x is
// of T (float, double); in a reduced type S (bfloat16, float16), relu(z) rounded to S, the
// norm layer's output that the composed max_pool2d reads, so that its ties (two values that
// round alike) are broken as the composition breaks them, by the first.
template <typename S, typename T>
inline Vec<T> pooled_keys(const Vec<T>& z) {  // (T named: a Vec<T> does not deduce it)
  if constexpr (std::is_same_v<S, T>) {
    return z;
  } else {
    return rounded_to<S, T>(relu(z));
  }
}

template <typename S, typename T>
inline T pooled_key(T z) {
  if constexpr (std::is_same_v<S, T>) {
    return z;
  } else {
    return static_cast<T>(static_cast<S>(relu(z)));
  }
}

// x: (N, C, H, W) channels_last float/double/bfloat16/float16, at least 2x2; mean and
// invstd: C values of a floating dtype (per_channel reads them in the compute type).
void check_pooled(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                  const at::Tensor& invstd) {
  check_affine(x, weight, bias);
  TORCH_CHECK(x.dim() == 4, "the pooled layer takes (N, C, H, W) input, got ", x.dim(),
              " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  reduced_float(x.scalar_type()),
              "the pooled layer reads float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "the pooled layer needs at least 2x2 planes, got ",
              x.size(2), "x", x.size(3));
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the pooled layer reads channels_last input only");
  check_statistic(mean, "mean", x.size(1));
  check_statistic(invstd, "invstd", x.size(1));
}

// (pooled output, choice): out (N, C, H / 2, W / 2) channels_last; choice (N, H / 2, W / 2, C)
// bytes: 0-3 the window's input taken (row-major in the window), kDead where it was <= 0.
std::tuple<at::Tensor, at::Tensor> relu_pool_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  check_pooled(x, weight, bias, mean, invstd);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2;
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto choice = at::empty({N, Ho, Wo, C}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "relu_pool_forward", [&] {
    using S = scalar_t;              // x's and the output's type
    using T = at::opmath_type<S>;    // the compute type: float for bfloat16 and float16
    constexpr bool kReduced = !std::is_same_v<S, T>;
    using V = Vec<T>;
    using Mk = Mask<T>;
    constexpr int L = kWidth<T>;
    const std::vector<T> m = per_channel<T>(mean, C, T(0));
    std::vector<T> k = per_channel<T>(invstd, C, T(1));
    const std::vector<T> w = per_channel<T>(weight, C, T(1));
    const std::vector<T> h = per_channel<T>(bias, C, T(0));
    for (int64_t c = 0; c < C; ++c) k[c] *= w[c];  // the forward's scale: invstd * weight
    const S* xp = x.const_data_ptr<S>();
    const T *mp = m.data(), *kp = k.data(), *hp = h.data();
    S* op = out.data_ptr<S>();
    uint8_t* cp = choice.data_ptr<uint8_t>();
    at::parallel_for(0, N * Ho, grain_for(N * Ho, 4 * Wo * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        const S* top = xp + (n * H + 2 * ho) * W * C;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          const S* in[4];
          window_inputs(top, W, C, wo, in);
          S* o = op + (r * Wo + wo) * C;
          uint8_t* ch = cp + (r * Wo + wo) * C;
          int64_t c = 0;
          for (; c + L <= C; c += L) {  // L channels at a time, as the scalar loop below
            const V mv = load_vec<T>(mp + c), kv = load_vec<T>(kp + c), hv = load_vec<T>(hp + c);
            V taken = (load_vec<T>(in[0] + c) - mv) * kv + hv;  // z of the input taken
            V best = pooled_keys<S, T>(taken);
            Mk at{};
            for (int j = 1; j < 4; ++j) {
              const V z = (load_vec<T>(in[j] + c) - mv) * kv + hv;
              const V key = pooled_keys<S, T>(z);
              const Mk take = (key > best) | (key != key);
              best = take ? key : best;
              if constexpr (kReduced) taken = take ? z : taken;
              at = take ? Mk{} + j : at;
            }
            if constexpr (!kReduced) taken = best;
            const Mk dead = taken <= V{};  // as the ReLU's gradient: z <= 0
            store_vec<T>(o + c, dead ? V{} : best);
            store_choice<T>(ch + c, dead ? Mk{} + kDead : at);
          }
          for (; c < C; ++c) {
            T taken = (static_cast<T>(in[0][c]) - mp[c]) * kp[c] + hp[c];
            T best = pooled_key<S>(taken);
            uint8_t at = 0;
            for (uint8_t j = 1; j < 4; ++j) {
              const T z = (static_cast<T>(in[j][c]) - mp[c]) * kp[c] + hp[c];
              const T key = pooled_key<S>(z);
              if (key > best || key != key) {  // max_pool2d's rule: the first largest, or a NaN
                best = key;
                taken = z;
                at = j;
              }
            }
            const bool dead = taken <= T(0);  // a NaN lives, as relu and its gradient keep it
            o[c] = dead ? S(0) : static_cast<S>(best);
            ch[c] = dead ? kDead : at;
          }
        }
      }
    });
  });
  return {out, choice};
}

// (dx, dweight, dbias) of the layer whose forward gave `choice`, from the pooled output's
// gradient: z's gradient dz is grad_out at the input each window took (zero elsewhere and in
// a dead window), then BatchNorm's backward of dz, as batch_norm_backward with relu computes
// it from the whole dz (batch_stats; without, the statistics are constants, as the eval's
// running ones: dx = invstd * weight * dz). Two passes: the sums (over the pooled values only: the rest of dz is
// zero), then dx over every input value.
std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& choice,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats) {
  check_pooled(x, weight, bias, mean, invstd);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(1) == C &&
                  grad_out.size(2) == Ho && grad_out.size(3) == Wo,
              "grad_out must be the pooled output's shape ", at::IntArrayRef({N, C, Ho, Wo}),
              ", got ", grad_out.sizes());
  check_device(&grad_out);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out must be of x's dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(choice.scalar_type() == at::kByte && choice.dim() == 4 && choice.size(0) == N &&
                  choice.size(1) == Ho && choice.size(2) == Wo && choice.size(3) == C &&
                  choice.is_contiguous(),
              "choice must be relu_pool_forward's contiguous uint8 (N, H/2, W/2, C) tensor, got ",
              choice.scalar_type(), " ", choice.sizes());
  check_device(&choice);
  const at::Tensor g = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  auto dx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto acc = at::toOpMathType(x.scalar_type());
  auto dweight = empty_channels(C, acc);
  auto dbias = empty_channels(C, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "relu_pool_backward", [&] {
    using S = scalar_t;            // x's, grad_out's and dx's type
    using T = at::opmath_type<S>;  // the compute type (and dweight's, dbias')
    using V = Vec<T>;
    using Mk = Mask<T>;
    constexpr int L = kWidth<T>;
    const std::vector<T> m = per_channel<T>(mean, C, T(0));
    const std::vector<T> k = per_channel<T>(invstd, C, T(1));
    const std::vector<T> w = per_channel<T>(weight, C, T(1));
    const S *xp = x.const_data_ptr<S>(), *gp = g.const_data_ptr<S>();
    const T* mp = m.data();
    const uint8_t* cp = choice.const_data_ptr<uint8_t>();
    // Pass 1: sum(dz) and sum(dz * (x - mean)) per channel, over a task's rows of windows in
    // T and across rows in double; tasks' partial sums reduced after. Every value of x is in
    // the second sum, with its dz of 0 where the pooling or the ReLU passed it nothing: as
    // torch's sum over the whole dz, it is NaN where a value of x is not finite (0 * inf).
    const int64_t threads = at::get_num_threads();
    std::vector<double> partial(2 * C * threads, 0.0);
    at::parallel_for(0, N * Ho, grain_for(N * Ho, 4 * Wo * C), [&](int64_t r0, int64_t r1) {
      double* s = partial.data() + 2 * C * at::get_thread_num();
      std::vector<T> row(2 * C);
      // values no window pools (an odd last column or row): dz = 0
      auto unpooled = [&](const S* xe, T* sdx) {
        for (int64_t c = 0; c < C; ++c) sdx[c] += T(0) * (static_cast<T>(xe[c]) - mp[c]);
      };
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        const S* top = xp + (n * H + 2 * ho) * W * C;
        std::fill(row.begin(), row.end(), T(0));
        T *sd = row.data(), *sdx = row.data() + C;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          const S* in[4];
          window_inputs(top, W, C, wo, in);
          const S* gr = gp + (r * Wo + wo) * C;
          const uint8_t* ch = cp + (r * Wo + wo) * C;
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            const Mk j = load_choice<T>(ch + c);  // a forged byte above 3: dead
            const V g = load_vec<T>(gr + c), mv = load_vec<T>(mp + c);
            V sum = load_vec<T>(sdx + c);
            for (int i = 0; i < 4; ++i) {
              sum += (j == i ? g : V{}) * (load_vec<T>(in[i] + c) - mv);
            }
            store_vec<T>(sdx + c, sum);
            store_vec<T>(sd + c, load_vec<T>(sd + c) + (j < 4 ? g : V{}));
          }
          for (; c < C; ++c) {
            const uint8_t j = ch[c];
            const T gc = static_cast<T>(gr[c]);
            for (uint8_t i = 0; i < 4; ++i) {
              sdx[c] += (j == i ? gc : T(0)) * (static_cast<T>(in[i][c]) - mp[c]);
            }
            sd[c] += j < 4 ? gc : T(0);
          }
        }
        if (W & 1) {
          unpooled(top + (W - 1) * C, sdx);
          unpooled(top + (2 * W - 1) * C, sdx);
        }
        if ((H & 1) && ho == Ho - 1) {
          for (int64_t ww = 0; ww < W; ++ww) unpooled(top + (2 * W + ww) * C, sdx);
        }
        for (int64_t c = 0; c < 2 * C; ++c) s[c] += static_cast<double>(row[c]);
      }
    });
    std::vector<double> sum_d(C, 0.0), sum_dx(C, 0.0);
    for (int64_t t = 0; t < threads; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        sum_d[c] += partial[2 * C * t + c];
        sum_dx[c] += partial[2 * C * t + C + c];
      }
    }
    // dx = invstd * w * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M), xhat = (x - mean) * invstd:
    // dx = a * dz + (b * (x - mean) + e) per channel.
    const double M = static_cast<double>(N * H * W);
    std::vector<T> a(C), b(C), e(C);
    auto* dw = dweight.data_ptr<T>();
    auto* db = dbias.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const double kc = static_cast<double>(k[c]), wc = static_cast<double>(w[c]);
      const double sum_dxhat = sum_dx[c] * kc;
      dw[c] = static_cast<T>(sum_dxhat);
      db[c] = static_cast<T>(sum_d[c]);
      a[c] = static_cast<T>(kc * wc);
      // running statistics (eval) are constants: no gradient through them
      b[c] = batch_stats ? static_cast<T>(-kc * wc * kc * sum_dxhat / M) : T(0);
      e[c] = batch_stats ? static_cast<T>(-kc * wc * sum_d[c] / M) : T(0);
    }
    const T *ap = a.data(), *bp = b.data(), *ep = e.data();
    S* dxp = dx.data_ptr<S>();
    // Pass 2: every input value, a row (n, h) of W * C at a time. Without batch statistics
    // dx = a * dz alone: x is not read (a NaN in it gives no NaN gradient, as torch's).
    auto pass2 = [&](auto batch_tag) {
      constexpr bool kBatch = decltype(batch_tag)::value;
      auto rest = [&](const V& xv, int64_t c) {  // the statistics' part, L channels
        return load_vec<T>(bp + c) * (xv - load_vec<T>(mp + c)) + load_vec<T>(ep + c);
      };
      at::parallel_for(0, N * H, grain_for(N * H, W * C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / H, hh = r % H;
          const S* xr = xp + r * W * C;
          S* dr = dxp + r * W * C;
          const bool pooled_row = hh < 2 * Ho;
          const uint8_t dy = static_cast<uint8_t>(2 * (hh & 1));
          for (int64_t ww = 0; ww < W; ++ww) {
            const S* xv = xr + ww * C;
            S* out = dr + ww * C;
            if (pooled_row && ww < 2 * Wo) {
              const int64_t at = (n * Ho + hh / 2) * Wo + ww / 2;
              const S* gr = gp + at * C;
              const uint8_t* ch = cp + at * C;
              const uint8_t mine = dy + static_cast<uint8_t>(ww & 1);
              int64_t c = 0;
              for (; c + L <= C; c += L) {
                const Mk j = load_choice<T>(ch + c);
                const V d = j == static_cast<int>(mine) ? load_vec<T>(gr + c) : V{};
                if constexpr (kBatch) {
                  store_vec<T>(out + c, load_vec<T>(ap + c) * d + rest(load_vec<T>(xv + c), c));
                } else {
                  store_vec<T>(out + c, load_vec<T>(ap + c) * d);
                }
              }
              for (; c < C; ++c) {
                const T d = ch[c] == mine ? static_cast<T>(gr[c]) : T(0);
                const T xc = static_cast<T>(xv[c]);
                out[c] = static_cast<S>(kBatch ? ap[c] * d + (bp[c] * (xc - mp[c]) + ep[c]) : ap[c] * d);
              }
            } else {
              int64_t c = 0;
              for (; c + L <= C; c += L) {
                store_vec<T>(out + c, kBatch ? rest(load_vec<T>(xv + c), c) : V{});
              }
              for (; c < C; ++c) {
                out[c] = static_cast<S>(kBatch ? bp[c] * (static_cast<T>(xv[c]) - mp[c]) + ep[c] : T(0));
              }
            }
          }
        }
      });
    };
    if (batch_stats) {
      pass2(std::true_type{});
    } else {
      pass2(std::false_type{});
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY(normbench, m) {
  m.def("batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool relu=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor invstd, bool relu=False) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_eval(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps, bool relu=False) -> Tensor");
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
        "Tensor invstd, float momentum, float eps, int count, "
        "Tensor(c!)? num_batches_tracked=None, bool cumulative=False) -> ()");
  m.def("batch_norm_stats(Tensor x, float eps) -> (Tensor, Tensor)");
  // The norm, its ReLU and 2x2 max-pooling in one layer (see "the ReLU and 2x2 max-pooling
  // fused"): the pooled output and each value's choice; the backward from them.
  m.def("relu_pool_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) "
        "-> (Tensor, Tensor)");
  m.def("relu_pool_backward(Tensor grad_out, Tensor x, Tensor choice, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor invstd, bool batch_stats=True) -> (Tensor, Tensor, Tensor)");
  // The backward's two passes apart, for synchronized BatchNorm (see "the backward in two
  // halves"): the sums, as (dweight, dbias); dx from sums and a count given.
  m.def("batch_norm_backward_reduce(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor invstd, bool relu=False) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_apply(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor invstd, Tensor sum_dy, Tensor sum_dy_xhat, int count, "
        "bool relu=False) -> Tensor");
  // Synchronized BatchNorm's statistics (see "synchronized statistics"): the local part's
  // row of a zeroed (parts, 1 + 2C) float64 table; the rows merged into (mean, var, invstd)
  // of the given dtype and the total count.
  m.def("batch_norm_stats_table(Tensor x, int parts, int part) -> Tensor");
  m.def("batch_norm_merge_stats(Tensor table, float eps, ScalarType dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The size from which outputs are streamed (see "streaming stores"), for reports.
  m.def("stream_threshold() -> int", &stream_threshold);
  // The order the kernels read a tensor in (see "the planes layout's order"), for reports.
  m.def("plane_order(Tensor x, bool backward=False) -> str", &plane_order);
  // The output pool (see "the output pool"): the bytes of freed outputs it keeps now, and
  // the most it keeps.
  m.def("pool_bytes() -> int", &pool_bytes);
  m.def("pool_limit() -> int", &pool_limit);
  // Its blocks handed back to the system: the bytes freed.
  m.def("empty_pool() -> int", &empty_pool);
}

TORCH_LIBRARY_IMPL(normbench, CPU, m) {
  m.impl("batch_norm_forward", &forward_train);
  m.impl("batch_norm_backward", &backward);
  m.impl("batch_norm_eval", &forward_eval);
  m.impl("update_running_stats", &update_running_stats_cpu);
  m.impl("batch_norm_stats", &batch_stats);
  m.impl("relu_pool_forward", &relu_pool_forward);
  m.impl("relu_pool_backward", &relu_pool_backward);
  m.impl("batch_norm_backward_reduce", &backward_reduce);
  m.impl("batch_norm_backward_apply", &backward_apply);
  m.impl("batch_norm_stats_table", &stats_table);
  m.impl("batch_norm_merge_stats", &merge_stats);
}

TORCH_LIBRARY_IMPL(normbench, Autograd, m) {
  m.impl("batch_norm_forward", &forward_autograd);
  m.impl("batch_norm_eval", &eval_autograd);
  // No gradient flows through these (the statistics and their update are constants to
  // autograd): past the autograd keys at once, without the fallback's per-call checks.
  m.impl("update_running_stats", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_stats", torch::CppFunction::makeFallthrough());
  m.impl("relu_pool_forward", torch::CppFunction::makeFallthrough());
  m.impl("relu_pool_backward", torch::CppFunction::makeFallthrough());
  // called inside synchronized BatchNorm's own autograd Function (Python), never differentiated
  m.impl("batch_norm_backward_reduce", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_backward_apply", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_stats_table", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_merge_stats", torch::CppFunction::makeFallthrough());
}
