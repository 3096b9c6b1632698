// agentcg-loadgen: the native load generator of `agentcg bench admission`.
//
// The Python generator (grpc.aio in spawned processes, clients/bench_admission.py) costs more
// than the broker's own reply on this machine's two cores. This one issues the same requests
// as `_fixed_rate` and `_closed_loop` there through gRPC C++'s callback API: a sender never
// waits for a reply, and a reply costs one callback on a gRPC thread.
//
//   rate:   open loop at --rate per second (--kind ping|reserve). The sender thread sleeps to
//           each request's scheduled time (clock_nanosleep, TIMER_ABSTIME) and starts the call;
//           latency runs from the SCHEDULED time (no coordinated omission), late_ms is the
//           actual start minus the scheduled time. Requests scheduled in the warm-up are sent
//           but not measured. Every 20 ms one ReleaseBatch releases the oldest granted leases
//           beyond --live; whatever is left is released at the end.
//           Prints {"latencies_ms": [...], "late_ms": [...], "errors": N}.
//   closed: --concurrency operations outstanding at all times from --start-at (epoch seconds)
//           for --warmup + --seconds (--kind noop|reserve_release|mixed|batch; mixed
//           alternates noop and reserve_release in 0.5 s wall-clock slices, an operation
//           counting for the slice it started in).
//           Prints {"ops": N, "seconds": S, "counts": {"noop": a, "reserve_release": b}}.
//
// Bad flags: a message on stderr and exit status 2. A failed RPC in the closed loop, or a
// broker that cannot be reached: a message and exit status 1.

#include <grpcpp/grpcpp.h>
#include <sys/prctl.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agentcg/v1/broker.grpc.pb.h"

namespace {

using agentcg::v1::Broker;
namespace pb = agentcg::v1;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr const char* kTenant = "bench";
constexpr double kSliceS = 0.5;           // mixed: noop and reserve_release alternate
constexpr int kBatch = 500;               // batch: requests per ReserveBatch
constexpr double kReleaseEveryS = 0.02;   // rate: the releaser's period
constexpr double kCallDeadlineS = 60.0;   // no call waits longer than this
constexpr double kConnectTimeoutS = 30.0;

const char kUsage[] =
    "usage: loadgen --address HOST:PORT --mode rate|closed [options]\n"
    "  --kind K          rate: ping|reserve (default reserve);\n"
    "                    closed: noop|reserve_release|mixed|batch (required)\n"
    "  --seconds S       measured seconds after the warm-up (default 3)\n"
    "  --warmup S        warm-up seconds, not measured (default 1)\n"
    "  --start-at T      start at this epoch time, seconds (default: now)\n"
    "  --rate R          rate: requests per second (required)\n"
    "  --live N          rate: leases kept live, the oldest beyond released (default 100)\n"
    "  --concurrency C   closed: operations in flight (required)\n";

// -- clocks -------------------------------------------------------------------------------------

double Seconds(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double Monotonic() { return Seconds(CLOCK_MONOTONIC); }
double Epoch() { return Seconds(CLOCK_REALTIME); }  // Python's time.time()

void SleepUntil(clockid_t clock, double t) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(std::floor(t));
  ts.tv_nsec = static_cast<long>((t - std::floor(t)) * 1e9);
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec += 1;
    ts.tv_nsec -= 1000000000L;
  }
  while (clock_nanosleep(clock, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
  }
}

// -- flags --------------------------------------------------------------------------------------

struct Options {
  std::string address;
  std::string mode;
  std::string kind;
  double seconds = 3.0;
  double warmup_s = 1.0;
  double start_at = 0.0;  // 0: now
  double rate = 0.0;
  long live = 100;
  long concurrency = 0;
};

[[noreturn]] void Usage(const std::string& problem) {
  std::fprintf(stderr, "loadgen: %s\n%s", problem.c_str(), kUsage);
  std::exit(2);
}

double ParseNumber(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v)) {
    Usage(flag + " wants a number, got '" + text + "'");
  }
  return v;
}

long ParseInteger(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') Usage(flag + " wants an integer, got '" + text + "'");
  return v;
}

Options ParseFlags(int argc, char** argv) {
  Options o;
  std::map<std::string, std::string> given;
  for (int k = 1; k < argc; ++k) {
    std::string arg = argv[k];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) Usage("unexpected argument '" + arg + "'");
    std::string name = arg, value;
    size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (k + 1 < argc) {
      value = argv[++k];
    } else {
      Usage(name + " wants a value");
    }
    if (given.count(name)) Usage(name + " given twice");
    given[name] = value;
  }
  // Each flag with the mode it belongs to ("" = both).
  const std::map<std::string, std::string> known = {
      {"--address", ""}, {"--mode", ""},     {"--kind", ""},          {"--seconds", ""},
      {"--warmup", ""},  {"--start-at", ""}, {"--rate", "rate"},      {"--live", "rate"},
      {"--concurrency", "closed"},
  };
  for (const auto& [name, value] : given) {
    if (!known.count(name)) Usage("unknown flag " + name);
  }
  auto get = [&](const char* name) { return given.count(name) ? given[name] : std::string(); };
  o.address = get("--address");
  o.mode = get("--mode");
  if (o.address.empty()) Usage("--address is required");
  if (o.mode != "rate" && o.mode != "closed") Usage("--mode must be rate or closed");
  for (const auto& [name, value] : given) {
    const std::string& only = known.at(name);
    if (!only.empty() && only != o.mode) Usage(name + " applies to --mode " + only + " only");
  }
  o.kind = get("--kind");
  if (o.mode == "rate") {
    if (o.kind.empty()) o.kind = "reserve";
    if (o.kind != "ping" && o.kind != "reserve") Usage("--kind for rate: ping or reserve");
    if (!given.count("--rate")) Usage("--rate is required with --mode rate");
    o.rate = ParseNumber("--rate", given["--rate"]);
    if (!(o.rate > 0)) Usage("--rate must be > 0");
    if (given.count("--live")) o.live = ParseInteger("--live", given["--live"]);
    if (o.live < 0) Usage("--live must be >= 0");
  } else {
    if (o.kind != "noop" && o.kind != "reserve_release" && o.kind != "mixed" &&
        o.kind != "batch") {
      Usage("--kind for closed: noop, reserve_release, mixed or batch");
    }
    if (!given.count("--concurrency")) Usage("--concurrency is required with --mode closed");
    o.concurrency = ParseInteger("--concurrency", given["--concurrency"]);
    if (o.concurrency < 1) Usage("--concurrency must be >= 1");
  }
  if (given.count("--seconds")) o.seconds = ParseNumber("--seconds", given["--seconds"]);
  if (!(o.seconds > 0)) Usage("--seconds must be > 0");
  if (given.count("--warmup")) o.warmup_s = ParseNumber("--warmup", given["--warmup"]);
  if (o.warmup_s < 0) Usage("--warmup must be >= 0");
  if (given.count("--start-at")) o.start_at = ParseNumber("--start-at", given["--start-at"]);
  return o;
}

// -- requests (the same as bench_admission._reserve_request) -------------------------------------

void FillReserve(pb::ReserveRequest* r, long i) {
  r->set_tenant(kTenant);
  r->set_session("s" + std::to_string(i % 64));
  r->set_command_class("bench");
  r->mutable_intent()->set_memory_bytes(kMiB);
}

void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<long>(kCallDeadlineS * 1000)));
}

std::string Describe(const char* rpc, const grpc::Status& s) {
  return std::string(rpc) + " failed: " + std::to_string(s.error_code()) + " " +
         s.error_message();
}

std::shared_ptr<grpc::Channel> Connect(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::milliseconds(static_cast<long>(kConnectTimeoutS * 1000));
  if (!channel->WaitForConnected(deadline)) {
    std::fprintf(stderr, "loadgen: cannot connect to %s within %.0f s\n", address.c_str(),
                 kConnectTimeoutS);
    std::exit(1);
  }
  return channel;
}

void PrintList(const char* key, const std::vector<double>& values) {
  std::printf("\"%s\": [", key);
  for (size_t k = 0; k < values.size(); ++k) std::printf(k ? ", %.4f" : "%.4f", values[k]);
  std::printf("]");
}

// -- rate: open loop ----------------------------------------------------------------------------

class FixedRate {
 public:
  FixedRate(const Options& o, std::shared_ptr<grpc::Channel> channel)
      : o_(o), stub_(Broker::NewStub(channel)) {}

  void Run() {
    const long n = static_cast<long>((o_.warmup_s + o_.seconds) * o_.rate);
    if (o_.start_at > 0) SleepUntil(CLOCK_REALTIME, o_.start_at);
    std::thread releaser([this] { ReleaseOld(); });
    const double t0 = Monotonic();
    t_begin_ = t0 + o_.warmup_s;
    for (long i = 0; i < n; ++i) {
      const double scheduled = t0 + static_cast<double>(i) / o_.rate;
      SleepUntil(CLOCK_MONOTONIC, scheduled);
      Send(i, scheduled);
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      idle_.wait(lock, [this] { return in_flight_ == 0; });
      stop_ = true;
      stopped_.notify_all();
    }
    releaser.join();
    std::vector<std::string> rest(pool_.begin(), pool_.end());
    pool_.clear();
    Release(rest);
    std::printf("{");
    PrintList("latencies_ms", latencies_ms_);
    std::printf(", ");
    PrintList("late_ms", late_ms_);
    std::printf(", \"errors\": %ld}\n", errors_);
  }

 private:
  // One call in flight: everything it needs lives until its callback.
  struct Call {
    grpc::ClientContext ctx;
    pb::PingRequest ping;
    pb::PingResponse pong;
    pb::ReserveRequest reserve;
    pb::ReserveResponse granted;
    double scheduled = 0;
    double sent = 0;
  };

  void Send(long i, double scheduled) {
    auto* call = new Call;
    call->scheduled = scheduled;
    SetDeadline(&call->ctx);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
    }
    auto done = [this, call](grpc::Status status) { Done(call, status); };
    if (o_.kind == "ping") {
      call->sent = Monotonic();
      stub_->async()->Ping(&call->ctx, &call->ping, &call->pong, done);
    } else {
      FillReserve(&call->reserve, i);
      call->sent = Monotonic();
      stub_->async()->Reserve(&call->ctx, &call->reserve, &call->granted, done);
    }
  }

  void Done(Call* call, const grpc::Status& status) {
    const double done = Monotonic();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!status.ok()) {
        ++errors_;
        if (errors_ <= 3) std::fprintf(stderr, "loadgen: %s\n", Describe(Rpc(), status).c_str());
      } else {
        if (call->scheduled >= t_begin_) {
          latencies_ms_.push_back((done - call->scheduled) * 1000);
          late_ms_.push_back((call->sent - call->scheduled) * 1000);
        }
        if (o_.kind != "ping") pool_.push_back(call->granted.lease().lease_id());
      }
      // Notified under the lock: once Run sees the last call done it may destroy this.
      if (--in_flight_ == 0) idle_.notify_all();
    }
    delete call;
  }

  const char* Rpc() const { return o_.kind == "ping" ? "Ping" : "Reserve"; }

  // Keep ~live leases: every 20 ms release the oldest beyond that in one ReleaseBatch, on this
  // thread (off the measured path: the sender never waits for it).
  void ReleaseOld() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (stopped_.wait_for(lock, std::chrono::duration<double>(kReleaseEveryS),
                            [this] { return stop_; })) {
        break;
      }
      std::vector<std::string> old;
      while (pool_.size() > static_cast<size_t>(o_.live)) {
        old.push_back(std::move(pool_.front()));
        pool_.pop_front();
      }
      if (old.empty()) continue;
      lock.unlock();
      Release(old);
      lock.lock();
    }
  }

  void Release(const std::vector<std::string>& ids) {
    if (ids.empty()) return;
    pb::ReleaseBatchRequest req;
    for (const auto& id : ids) req.add_requests()->set_lease_id(id);
    pb::ReleaseBatchResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status status = stub_->ReleaseBatch(&ctx, req, &resp);
    if (!status.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      ++errors_;
      std::fprintf(stderr, "loadgen: %s\n", Describe("ReleaseBatch", status).c_str());
    }
  }

  const Options& o_;
  std::unique_ptr<Broker::Stub> stub_;
  double t_begin_ = 0;  // monotonic: requests scheduled from here on are measured
  std::mutex mu_;       // everything below
  std::condition_variable idle_;     // in_flight_ fell to 0
  std::condition_variable stopped_;  // stop_ set
  long in_flight_ = 0;
  bool stop_ = false;
  long errors_ = 0;
  std::vector<double> latencies_ms_, late_ms_;
  std::deque<std::string> pool_;  // granted lease ids, oldest first
};

// -- closed: a fixed number of operations outstanding -------------------------------------------

class ClosedLoop {
 public:
  ClosedLoop(const Options& o, std::shared_ptr<grpc::Channel> channel)
      : o_(o), stub_(Broker::NewStub(channel)) {
    for (int k = 0; k < kBatch; ++k) FillReserve(batch_.add_requests(), k);
  }

  void Run() {
    const double start_at = o_.start_at > 0 ? o_.start_at : Epoch();
    t_begin_ = start_at + o_.warmup_s;
    t_end_ = t_begin_ + o_.seconds;
    SleepUntil(CLOCK_REALTIME, start_at);
    std::vector<std::unique_ptr<Worker>> workers;
    for (long w = 0; w < o_.concurrency; ++w) workers.push_back(std::make_unique<Worker>(this));
    running_ = o_.concurrency;
    for (auto& w : workers) w->Next();
    {
      std::unique_lock<std::mutex> lock(mu_);
      finished_.wait(lock, [this] { return running_ == 0; });
    }
    std::printf("{\"ops\": %ld, \"seconds\": %.6g, \"counts\": {\"noop\": %ld, "
                "\"reserve_release\": %ld}}\n",
                ops_.load(), o_.seconds, noop_.load(), reserve_release_.load());
  }

 private:
  // One chain of operations, each started from the callback that ends the one before.
  class Worker {
   public:
    explicit Worker(ClosedLoop* loop) : loop_(loop) {}

    void Next() {
      started_ = Epoch();
      if (started_ >= loop_->t_end_) {
        loop_->Finish();
        return;
      }
      op_ = loop_->o_.kind;
      if (op_ == "mixed") {
        // Python's floor division and modulo: the warm-up's last slice is -1, odd.
        const long slice = static_cast<long>(std::floor((started_ - loop_->t_begin_) / kSliceS));
        op_ = ((slice % 2) + 2) % 2 == 0 ? "noop" : "reserve_release";
      }
      ctx_ = std::make_unique<grpc::ClientContext>();
      SetDeadline(ctx_.get());
      Broker::Stub::async_interface* stub = loop_->stub_->async();
      if (op_ == "noop") {
        stub->Ping(ctx_.get(), &ping_, &pong_, [this](grpc::Status s) {
          if (Check("Ping", s)) Count(1);
        });
      } else if (op_ == "reserve_release") {
        reserve_.Clear();
        FillReserve(&reserve_, i_);
        stub->Reserve(ctx_.get(), &reserve_, &granted_, [this](grpc::Status s) {
          if (!Check("Reserve", s)) return;
          release_.set_lease_id(granted_.lease().lease_id());
          ctx_ = std::make_unique<grpc::ClientContext>();
          SetDeadline(ctx_.get());
          loop_->stub_->async()->Release(ctx_.get(), &release_, &released_,
                                         [this](grpc::Status s2) {
                                           if (Check("Release", s2)) Count(2);
                                         });
        });
      } else {  // batch
        stub->ReserveBatch(ctx_.get(), &loop_->batch_, &batch_granted_, [this](grpc::Status s) {
          if (!Check("ReserveBatch", s)) return;
          release_batch_.Clear();
          for (const auto& r : batch_granted_.results()) {
            if (r.has_lease()) release_batch_.add_requests()->set_lease_id(r.lease().lease_id());
          }
          ctx_ = std::make_unique<grpc::ClientContext>();
          SetDeadline(ctx_.get());
          loop_->stub_->async()->ReleaseBatch(
              ctx_.get(), &release_batch_, &batch_released_, [this](grpc::Status s2) {
                if (Check("ReleaseBatch", s2)) {
                  Count(batch_granted_.results_size() + release_batch_.requests_size());
                }
              });
        });
      }
    }

   private:
    bool Check(const char* rpc, const grpc::Status& s) {
      if (s.ok()) return true;
      std::fprintf(stderr, "loadgen: %s\n", Describe(rpc, s).c_str());
      std::_Exit(1);  // the Python generator raises: a failed RPC ends the run
    }

    void Count(long n) {
      ++i_;
      if (loop_->o_.kind == "mixed") {
        if (loop_->t_begin_ <= started_) {  // by the slice it started in (may end past t_end)
          (op_ == "noop" ? loop_->noop_ : loop_->reserve_release_) += n;
        }
      } else if (loop_->t_begin_ <= started_ && Epoch() <= loop_->t_end_) {
        loop_->ops_ += n;
      }
      Next();
    }

    ClosedLoop* loop_;
    long i_ = 0;
    double started_ = 0;
    std::string op_;
    std::unique_ptr<grpc::ClientContext> ctx_;
    pb::PingRequest ping_;
    pb::PingResponse pong_;
    pb::ReserveRequest reserve_;
    pb::ReserveResponse granted_;
    pb::ReleaseRequest release_;
    pb::ReleaseResponse released_;
    pb::ReserveBatchResponse batch_granted_;
    pb::ReleaseBatchRequest release_batch_;
    pb::ReleaseBatchResponse batch_released_;
  };

  void Finish() {
    std::lock_guard<std::mutex> lock(mu_);  // notified under it: Run may then destroy this
    if (--running_ == 0) finished_.notify_all();
  }

  const Options& o_;
  std::unique_ptr<Broker::Stub> stub_;
  pb::ReserveBatchRequest batch_;  // the same 500 requests every time, as in Python
  double t_begin_ = 0, t_end_ = 0;  // epoch seconds
  std::atomic<long> ops_{0}, noop_{0}, reserve_release_{0};
  std::mutex mu_;
  std::condition_variable finished_;
  long running_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = ParseFlags(argc, argv);
  prctl(PR_SET_TIMERSLACK, 1UL);  // wake at the scheduled time, not up to 50 us after it
  auto channel = Connect(o.address);
  if (o.mode == "rate") {
    FixedRate(o, channel).Run();
  } else {
    ClosedLoop(o, channel).Run();
  }
  return 0;
}
