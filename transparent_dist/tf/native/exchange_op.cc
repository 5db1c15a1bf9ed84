// TdAllreduce: the gradient exchange as a TensorFlow kernel that calls MPI
// directly, with no Python (and no GIL) on the hot path.
//
// Built on first use by transparent_dist/native (g++ and TensorFlow's own
// headers; no MPI headers): the MPI entry points and handles are the ones
// mpi4py already loaded, handed over once through td_configure(). MPI
// handles are passed as pointer-sized integers; MPICH-family libraries use
// 32-bit ints and Open MPI / the MPI-5 ABI use pointers, and both arrive
// correctly in the integer registers of the x86-64 and AArch64 calling
// conventions.
//
// Two asynchronous ops, whose MPI work runs on the plugin's one
// communication thread (CommThread, a FIFO queue), so no TensorFlow thread
// ever blocks in MPI and the rest of the backward pass keeps computing while
// a bucket of gradients is exchanged:
//   TdNegotiate: once per step, a 2-double MPI_Allreduce of this rank's
//      weight (its sample count) and 1: the sum of the weights and the
//      number of ranks, from which every bucket of the step knows how to
//      scale before any gradient moves. Its only input is the step's sample
//      count, known when the step starts, so it runs during the forward pass.
//   TdAllreduce: one bucket of gradients. The tensors stream through
//      chunks of kChunkBytes, each scaled (if need be) and then reduced in
//      place while it is in cache. A large tensor is reduced in its own
//      output buffer (the input buffer itself when TensorFlow lets the
//      kernel reuse it, so it is never copied); small tensors are packed
//      together so a bucket of many small variables costs few MPI calls.
//      With 16-bit compression the chunk is converted on the way in and back
//      on the way out.
//
// Why the order of collectives is the same on every rank (MPI requires the
// collectives on a communicator to be issued in the same order by every
// rank): the ops are stateful and take no resource, so inside a
// tf.function TensorFlow's automatic control dependencies chain them in
// program order, and transparent_dist/tf/exchange.py also chains each
// bucket to the one before it explicitly (for TF1 graphs, which have no
// automatic dependencies). An op therefore starts (ComputeAsync) only after
// the previous one has finished (its done()), so each rank enqueues its
// jobs in program order; one thread runs the queue in enqueue order; and
// every rank runs the same graph. The chain costs nothing: with one
// communication thread the next bucket could not start earlier anyway.
//
// MPI from our own thread: mpi4py initialises MPI with
// MPI_THREAD_MULTIPLE (transparent_dist/core/world.py asks for it), so any
// thread may call MPI, while Python threads (the watchdog, on its own
// communicator) do too. Should an MPI grant less, td_configure is told so
// and the ops run their MPI work inline on the calling TensorFlow thread,
// as the synchronous kernel did, under one mutex.

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/numeric_types.h"

namespace {

using tensorflow::AsyncOpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

typedef int (*AllreduceFn)(const void*, void*, int, intptr_t, intptr_t, intptr_t);
typedef void (*UserFn)(void*, void*, int*, void*);
typedef int (*OpCreateFn)(UserFn, int, void*);

// A chunk stays in a core's L2 cache between being scaled and being read by
// MPI. (Measured on a 2-core EPYC VM, 25 MB of gradients: 128 KB chunks
// were 15% slower than 1 MB; 2-4 MB were within noise of 1 MB; 16-32 MB
// were 15-25% slower.)
constexpr size_t kChunkBytes = 1 << 20;

struct Mpi {
  AllreduceFn allreduce = nullptr;
  intptr_t comm = 0, float32 = 0, float64 = 0, uint16 = 0, sum = 0, in_place = 0;
  intptr_t half_sum = 0, bfloat16_sum = 0;
};
Mpi g_mpi;
std::atomic<bool> g_ready{false};

// Counters read by transparent_dist.native.counters() (seconds, bytes).
enum Counter {
  kExchangeSeconds,
  kWaitSeconds,
  kBytes,
  kExchanges,
  kSamples,
  kReduceSeconds,
  kCounters
};
std::mutex g_counter_mutex;
double g_counters[kCounters] = {};
std::atomic<int64_t> g_arrivals{0};

// Timeline spans (kind, start, end in CLOCK_MONOTONIC seconds, the clock
// of Python's time.perf_counter, and the bucket's number or -1), drained by
// transparent_dist.native. Kinds: see kSpanWait ... in op.py's _SPAN_NAMES.
enum SpanKind { kSpanWait, kSpanExchange, kSpanMetrics, kSpanQueued };
constexpr int kSpanDoubles = 4;
std::atomic<bool> g_record{false};
std::mutex g_span_mutex;
std::vector<double> g_spans;

// One fusion buffer, used by one job at a time: jobs run on the one
// communication thread, or inline under this mutex (then it serialises
// them, as it did the synchronous kernel's calls).
std::mutex g_exchange_mutex;
std::vector<char> g_fusion;

// Whether MPI may be called from the communication thread (the thread
// level is MPI_THREAD_MULTIPLE); else jobs run inline.
std::atomic<bool> g_threaded{false};

// The plugin's communication thread: runs jobs one at a time, in the order
// they were enqueued (see the top of the file for why that order is the
// same on every rank). Started on the first job; never stopped: it sleeps
// on its condition variable between jobs, and the object is never
// destroyed, so no static destructor runs under it at process exit.
class CommThread {
 public:
  void Enqueue(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!started_) {
        std::thread(&CommThread::Run, this).detach();
        started_ = true;
      }
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
  }

 private:
  void Run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> jobs_;
  bool started_ = false;
};

CommThread* g_comm_thread = new CommThread;  // never deleted (see above)

// Runs `job` (the MPI work of one op) on the communication thread, or inline
// when MPI allows only one thread in it at a time.
void Submit(std::function<void()> job) {
  if (g_threaded.load()) {
    g_comm_thread->Enqueue(std::move(job));
    return;
  }
  job();
}

// Large gradients are reduced in the buffers TensorFlow allocated, which
// sit on 4 KB pages; MPI moves big messages between processes markedly
// faster from transparent huge pages (measured here: a 25 MB MPI_Allreduce
// took 3.2 ms on huge pages, 4.8 ms on 4 KB pages). So the 2 MB-aligned
// interior of each large buffer is collapsed into huge pages, once per
// buffer (TensorFlow hands the op the same buffers step after step). The
// contents do not change; where the kernel cannot (no THP, an old kernel),
// nothing happens.
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
size_t HugePageBytes() {
  static const size_t bytes = [] {
    size_t value = 0;
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
      unsigned long long read = 0;
      if (std::fscanf(f, "%llu", &read) == 1) value = static_cast<size_t>(read);
      std::fclose(f);
    }
    return value;
  }();
  return bytes;
}

// Ranges already collapsed. Collapsing costs about a copy of the range, so
// it is tried only in the first kHugeCalls exchanges: should TensorFlow
// hand over new buffers every step, the op stops trying.
constexpr int kHugeCalls = 32;
std::set<std::pair<uintptr_t, uintptr_t>> g_huge;
int g_huge_calls = 0;

// Called with g_exchange_mutex held.
void UseHugePages(void* data, size_t bytes) {
  const size_t page = HugePageBytes();
  if (page == 0 || bytes < 2 * page || g_huge_calls >= kHugeCalls) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) / page * page;
  if (!g_huge.insert({begin, end}).second) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_COLLAPSE);
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Span(int kind, double start, double end, int bucket = -1) {
  if (!g_record.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(g_span_mutex);
  if (g_spans.size() < kSpanDoubles * 1000000) {
    g_spans.insert(g_spans.end(), {double(kind), start, end, double(bucket)});
  }
}

template <typename W>
void SumSixteen(void* in, void* inout, int* len, void*) {
  const W* a = static_cast<const W*>(in);
  W* b = static_cast<W*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = W(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

// The arithmetic type a scale is applied in: float for 32- and 16-bit data.
template <typename T>
struct Compute { typedef float type; };
template <>
struct Compute<double> { typedef double type; };

// out[i] = To(in[i] * scale) for distinct buffers, or in place (the
// separate loops let the compiler vectorize both: a loop whose two pointers
// might overlap is vectorized only behind a runtime check that equal
// pointers fail).
template <typename From, typename To>
void Convert(const From* in, To* out, int64_t n, double scale) {
  typedef typename Compute<From>::type C;
  const C s = static_cast<C>(scale);
  if (static_cast<const void*>(in) == static_cast<void*>(out)) {
    From* data = const_cast<From*>(in);
    for (int64_t i = 0; i < n; ++i) data[i] = From(static_cast<C>(data[i]) * s);
    return;
  }
  const From* __restrict src = in;
  To* __restrict dst = out;
  if (scale == 1.0) {
    if (std::is_same<From, To>::value) {
      std::memcpy(dst, src, n * sizeof(From));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = To(static_cast<C>(src[i]));
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = To(static_cast<C>(src[i]) * s);
}

// Into the wire buffer, scaled by this rank's share.
template <typename T, typename W>
void Pack(const T* src, W* dst, int64_t n, double scale) {
  if (scale == 0.0) {
    // A rank with no samples this step may hold NaN (a mean over nothing):
    // it contributes exactly zero.
    std::fill(dst, dst + n, W(0.0f));
  } else if (!(scale == 1.0 && static_cast<const void*>(src) == static_cast<void*>(dst))) {
    Convert(src, dst, n, scale);
  }
}

// Out of the wire buffer.
template <typename W, typename T>
void Unpack(const W* src, T* dst, int64_t n) {
  Convert(src, dst, n, 1.0);
}

template <typename W>
intptr_t Datatype();
template <> intptr_t Datatype<float>() { return g_mpi.float32; }
template <> intptr_t Datatype<double>() { return g_mpi.float64; }
template <> intptr_t Datatype<Eigen::half>() { return g_mpi.uint16; }
template <> intptr_t Datatype<Eigen::bfloat16>() { return g_mpi.uint16; }

template <typename W>
intptr_t SumOp();
template <> intptr_t SumOp<float>() { return g_mpi.sum; }
template <> intptr_t SumOp<double>() { return g_mpi.sum; }
template <> intptr_t SumOp<Eigen::half>() { return g_mpi.half_sum; }
template <> intptr_t SumOp<Eigen::bfloat16>() { return g_mpi.bfloat16_sum; }

// In-place sum over ranks of `n` elements at `data`.
template <typename W>
tensorflow::Status Reduce(W* data, int64_t n, double* reduce_seconds) {
  const double start = Now();
  const int rc = g_mpi.allreduce(reinterpret_cast<const void*>(g_mpi.in_place), data,
                                 static_cast<int>(n), Datatype<W>(), SumOp<W>(), g_mpi.comm);
  *reduce_seconds += Now() - start;
  if (rc != 0) {
    return tensorflow::errors::Internal("transparent_dist: MPI_Allreduce failed with code ", rc);
  }
  return tensorflow::OkStatus();
}

// A piece of tensor `index`, elements [offset, offset + count), waiting in
// the fusion buffer at `at`.
struct Piece {
  int index;
  int64_t offset, count, at;
};

// Hands `done` to one of TensorFlow's threads rather than calling it on the
// communication thread: the executor runs cheap successors of an op inline
// in the thread that calls done(), and they must not delay the next bucket.
void Finish(std::function<void(std::function<void()>)>* runner,
            AsyncOpKernel::DoneCallback done) {
  if (runner != nullptr && *runner) {
    (*runner)(std::move(done));
  } else {
    done();
  }
}

// Scales (by `prescale`) and sums over ranks the tensors input(first ...)
// into `outputs`. Runs with g_exchange_mutex held.
template <typename T, typename W>
tensorflow::Status Exchange(OpKernelContext* ctx, int first, const std::vector<Tensor*>& outputs,
                            double prescale, int64_t* moved, double* reduce_seconds) {
  ++g_huge_calls;
  const int n = static_cast<int>(outputs.size());
  const int64_t chunk = kChunkBytes / sizeof(W);
  if (g_fusion.size() < kChunkBytes) g_fusion.resize(kChunkBytes);
  W* fusion = reinterpret_cast<W*>(g_fusion.data());
  std::vector<Piece> pieces;
  int64_t used = 0;
  auto flush = [&]() -> tensorflow::Status {
    if (used == 0) return tensorflow::OkStatus();
    TF_RETURN_IF_ERROR(Reduce(fusion, used, reduce_seconds));
    for (const Piece& p : pieces) {
      Unpack(fusion + p.at, outputs[p.index]->flat<T>().data() + p.offset, p.count);
    }
    *moved += used;
    pieces.clear();
    used = 0;
    return tensorflow::OkStatus();
  };
  for (int i = 0; i < n; ++i) {
    const T* src = ctx->input(first + i).flat<T>().data();
    T* dst = outputs[i]->flat<T>().data();
    const int64_t size = ctx->input(first + i).NumElements();
    if (std::is_same<T, W>::value && size >= chunk / 4) {
      // Large: reduced where it lies, chunk by chunk.
      TF_RETURN_IF_ERROR(flush());
      UseHugePages(dst, size * sizeof(T));
      for (int64_t offset = 0; offset < size; offset += chunk) {
        const int64_t count = std::min(chunk, size - offset);
        W* target = reinterpret_cast<W*>(dst + offset);
        Pack(src + offset, target, count, prescale);
        TF_RETURN_IF_ERROR(Reduce(target, count, reduce_seconds));
      }
      *moved += size;
      continue;
    }
    for (int64_t offset = 0; offset < size;) {
      if (used == chunk) TF_RETURN_IF_ERROR(flush());
      const int64_t count = std::min(chunk - used, size - offset);
      Pack(src + offset, fusion + used, count, prescale);
      pieces.push_back({i, offset, count, used});
      used += count;
      offset += count;
    }
  }
  return flush();
}

// The step's negotiation: totals = (sum of the ranks' weights, number of
// ranks), one 2-double MPI_Allreduce on the communication thread. It is
// where ranks wait for each other at the start of a step, so it is timed
// apart from the exchange proper (the "wait" span and counter).
class TdNegotiateOp : public AsyncOpKernel {
 public:
  explicit TdNegotiateOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("count_samples", &count_samples_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_ASYNC(ctx, g_ready.load(),
                      tensorflow::errors::FailedPrecondition(
                          "transparent_dist: the native exchange was not configured"),
                      done);
    const double weight = ctx->input(0).scalar<double>()();
    Tensor* totals = nullptr;
    OP_REQUIRES_OK_ASYNC(ctx, ctx->allocate_output(0, tensorflow::TensorShape({2}), &totals),
                         done);
    auto* runner = ctx->runner();
    const bool count_samples = count_samples_;
    Submit([ctx, done, runner, weight, totals, count_samples]() {
      int rc = 0;
      {
        std::lock_guard<std::mutex> lock(g_exchange_mutex);
        g_arrivals.fetch_add(1);
        const double started = Now();
        const double mine[2] = {weight, 1.0};
        rc = g_mpi.allreduce(mine, totals->flat<double>().data(), 2, g_mpi.float64, g_mpi.sum,
                             g_mpi.comm);
        const double ended = Now();
        {
          std::lock_guard<std::mutex> counters(g_counter_mutex);
          g_counters[kWaitSeconds] += ended - started;
          if (count_samples && rc == 0) g_counters[kSamples] += weight;
        }
        Span(kSpanWait, started, ended);
      }
      if (rc != 0) {
        ctx->SetStatus(tensorflow::errors::Internal(
            "transparent_dist: MPI_Allreduce of the step weights failed with code ", rc));
      }
      Finish(runner, done);
    });
  }

 private:
  bool count_samples_ = false;
};

template <typename T, typename W>
class TdAllreduceOp : public AsyncOpKernel {
 public:
  explicit TdAllreduceOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("average", &average_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("divided", &divided_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bucket", &bucket_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_ASYNC(ctx, g_ready.load(),
                      tensorflow::errors::FailedPrecondition(
                          "transparent_dist: the native exchange was not configured"),
                      done);
    constexpr int kFirst = 2;  // weight, totals, then the tensors
    const int n = ctx->num_inputs() - kFirst;
    const double weight = ctx->input(0).scalar<double>()();
    // The mean is sum_r(w_r * g_r) / sum_r(w_r): each rank scales its part
    // by its share w_r / sum(w) on the way in (a rank with weight 0 sends
    // exact zeros, whatever NaN its empty batch produced). When the train
    // step already divided the loss by N (`divided`), the gradients are
    // g_r / N, and on every step where all ranks have the same weight the
    // share times N is exactly 1: the gradients go to MPI untouched, with
    // no pass over them. (Scaling after the sum instead was measured
    // slower: the reduced chunk is no longer in this core's cache.)
    double prescale = 1.0;
    if (average_) {
      const Tensor& totals = ctx->input(1);
      OP_REQUIRES_ASYNC(ctx, totals.NumElements() == 2,
                        tensorflow::errors::InvalidArgument(
                            "transparent_dist: totals must be TdNegotiate's 2 numbers"),
                        done);
      const double sum = totals.flat<double>()(0), ranks = totals.flat<double>()(1);
      if (sum <= 0.0) {
        prescale = 0.0;
      } else if (!divided_) {
        prescale = weight / sum;
      } else {
        // Sample counts are small integers: N * w == sum(w) is exact.
        prescale = ranks * weight == sum ? 1.0 : ranks * weight / sum;
      }
    }
    std::vector<Tensor*> outputs(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK_ASYNC(ctx,
                           ctx->forward_input_or_allocate_output(
                               {i + kFirst}, i, ctx->input(i + kFirst).shape(), &outputs[i]),
                           done);
    }
    auto* runner = ctx->runner();
    const bool average = average_;
    const int bucket = bucket_;
    const double queued = Now();
    Submit([ctx, done, runner, outputs, prescale, average, bucket, queued]() {
      tensorflow::Status status;
      {
        std::lock_guard<std::mutex> lock(g_exchange_mutex);
        g_arrivals.fetch_add(1);
        const double started = Now();
        int64_t moved = 0;
        double reduce_seconds = 0.0;
        status = Exchange<T, W>(ctx, kFirst, outputs, prescale, &moved, &reduce_seconds);
        const double ended = Now();
        if (!average) {  // metric sums: not part of the gradient exchange figures
          Span(kSpanMetrics, started, ended);
        } else {
          std::lock_guard<std::mutex> counters(g_counter_mutex);
          g_counters[kExchangeSeconds] += ended - started;
          g_counters[kReduceSeconds] += reduce_seconds;
          g_counters[kBytes] += static_cast<double>(moved) * sizeof(W);
          g_counters[kExchanges] += 1;
        }
        if (average) {
          Span(kSpanQueued, queued, started, bucket);
          Span(kSpanExchange, started, ended, bucket);
        }
      }
      if (!status.ok()) ctx->SetStatus(status);
      Finish(runner, done);
    });
  }

 private:
  bool average_ = true;
  bool divided_ = false;
  int bucket_ = -1;
};

}  // namespace

REGISTER_OP("TdNegotiate")
    .Input("weight: float64")
    .Output("totals: float64")
    .Attr("count_samples: bool = false")
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(2));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TdNegotiate").Device(tensorflow::DEVICE_CPU), TdNegotiateOp);

REGISTER_OP("TdAllreduce")
    .Input("weight: float64")
    .Input("totals: float64")
    .Input("tensors: N * T")
    .Output("reduced: N * T")
    .Attr("N: int >= 1")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr("wire: {'same', 'fp16', 'bf16'} = 'same'")
    .Attr("average: bool = true")
    .Attr("divided: bool = false")
    .Attr("bucket: int = -1")
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->input(i + 2));
      return tensorflow::OkStatus();
    });

#define TD_REGISTER(T, WIRE, W)                                                      \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("TdAllreduce").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T")      \
          .AttrConstraint("wire", WIRE),                                              \
      TdAllreduceOp<T, W>)

TD_REGISTER(float, "same", float);
TD_REGISTER(double, "same", double);
TD_REGISTER(Eigen::half, "same", Eigen::half);
TD_REGISTER(Eigen::bfloat16, "same", Eigen::bfloat16);
TD_REGISTER(float, "fp16", Eigen::half);
TD_REGISTER(float, "bf16", Eigen::bfloat16);

extern "C" {

// Hands over mpi4py's MPI: function addresses and handles. Returns 0, or
// the error code of MPI_Op_create.
// `threaded`: MPI was initialised with MPI_THREAD_MULTIPLE, so the MPI work
// may run on the communication thread.
int td_configure(intptr_t allreduce, intptr_t op_create, intptr_t comm, intptr_t float32,
                 intptr_t float64, intptr_t uint16, intptr_t sum, intptr_t in_place,
                 intptr_t threaded) {
  std::lock_guard<std::mutex> lock(g_exchange_mutex);
  g_threaded.store(threaded != 0);
  g_mpi.allreduce = reinterpret_cast<AllreduceFn>(allreduce);
  g_mpi.comm = comm;
  g_mpi.float32 = float32;
  g_mpi.float64 = float64;
  g_mpi.uint16 = uint16;
  g_mpi.sum = sum;
  g_mpi.in_place = in_place;
  if (g_mpi.half_sum == 0) {
    OpCreateFn create = reinterpret_cast<OpCreateFn>(op_create);
    int64_t handle = 0;  // an int (MPICH) or a pointer (Open MPI) is written here
    int rc = create(&SumSixteen<Eigen::half>, 1, &handle);
    if (rc != 0) return rc;
    g_mpi.half_sum = static_cast<intptr_t>(handle);
    handle = 0;
    rc = create(&SumSixteen<Eigen::bfloat16>, 1, &handle);
    if (rc != 0) return rc;
    g_mpi.bfloat16_sum = static_cast<intptr_t>(handle);
  }
  g_ready.store(true);
  return 0;
}

void td_record_spans(int on) { g_record.store(on != 0); }

// Copies the counters (see enum Counter) into out[0..kCounters).
int td_counters(double* out) {
  std::lock_guard<std::mutex> lock(g_counter_mutex);
  std::copy(g_counters, g_counters + kCounters, out);
  return kCounters;
}

void td_reset_counters() {
  std::lock_guard<std::mutex> lock(g_counter_mutex);
  std::fill(g_counters, g_counters + kCounters, 0.0);
}

// Collectives this process has entered (for the stall watchdog).
int64_t td_arrivals() { return g_arrivals.load(); }

// Moves up to `capacity` recorded spans into out (kSpanDoubles each: kind,
// start, end, bucket); returns how many.
int td_take_spans(double* out, int capacity) {
  std::lock_guard<std::mutex> lock(g_span_mutex);
  const int count = std::min<int>(capacity, g_spans.size() / kSpanDoubles);
  std::copy(g_spans.begin(), g_spans.begin() + kSpanDoubles * count, out);
  g_spans.erase(g_spans.begin(), g_spans.begin() + kSpanDoubles * count);
  return count;
}

}  // extern "C"
