// /dev/kvmmem for Node: the two ioctl ABIs of ../../../../shared/spec/kvmmem.md (§3 ABI v1, §4 ABI v2),
// plus the file-mapping primitives the simulated device uses, with every mapped page exposed as a
// zero-copy external ArrayBuffer that is DETACHED (byteLength 0) when it is unmapped or the handle is
// closed, so JavaScript can never touch an unmapped address.
//
// Errors are thrown as Error objects with `code` = the errno name (EALREADY, ENOENT, EINVAL, EPERM,
// ENOMEM, ENOTTY, ...), `errno` = the number and `syscall` = the call ("ioctl KVM_INTRO_MEM_MAP", "mmap").
#include <napi.h>
#include <openssl/sha.h>  // Node's bundled OpenSSL (exported by the node binary; headers in <nodedir>/include/node)

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

namespace {

// ---- the ABI (kvmmem.md §1, §3.1, §4.1) -----------------------------------------------------------

struct kvmi_mem_token {
  uint64_t token[4];
};
struct kvmi_mem_map {  // ABI v1
  kvmi_mem_token token;
  uint64_t gpa;
  uint64_t gva;
};
struct kvmi_guest_mem_map {  // ABI v2
  kvmi_mem_token token;
  uint64_t gpa;
  uint64_t length;
};
static_assert(sizeof(kvmi_mem_token) == 32, "struct kvmi_mem_token is 32 bytes");
static_assert(sizeof(kvmi_mem_map) == 48, "struct kvmi_mem_map is 48 bytes");
static_assert(sizeof(kvmi_guest_mem_map) == 48, "struct kvmi_guest_mem_map is 48 bytes");

// The numbers of the fact sheet, written out; the static_asserts recompute them with the kernel macros.
constexpr unsigned long KVM_INTRO_MEM_MAP = 0x40306901UL;    // _IOW('i', 0x01, struct kvmi_mem_map)
constexpr unsigned long KVM_INTRO_MEM_UNMAP = 0x40086902UL;  // _IOW('i', 0x02, unsigned long): by value
constexpr unsigned long KVM_GUEST_MEM_OPEN = 0x40086901UL;   // _IOW('i', 0x01, unsigned char *)
constexpr unsigned long KVM_GUEST_MEM_MAP = 0xC0306902UL;    // _IOWR('i', 0x02, struct kvmi_guest_mem_map)
constexpr unsigned long KVM_GUEST_MEM_UNMAP = 0x40086903UL;  // _IOW('i', 0x03, unsigned long): by value
static_assert(_IOW('i', 0x01, struct kvmi_mem_map) == KVM_INTRO_MEM_MAP, "KVM_INTRO_MEM_MAP");
static_assert(_IOW('i', 0x02, unsigned long) == KVM_INTRO_MEM_UNMAP, "KVM_INTRO_MEM_UNMAP");
static_assert(_IOW('i', 0x01, unsigned char *) == KVM_GUEST_MEM_OPEN, "KVM_GUEST_MEM_OPEN");
static_assert(_IOWR('i', 0x02, struct kvmi_guest_mem_map) == KVM_GUEST_MEM_MAP, "KVM_GUEST_MEM_MAP");
static_assert(_IOW('i', 0x03, unsigned long) == KVM_GUEST_MEM_UNMAP, "KVM_GUEST_MEM_UNMAP");

constexpr size_t PAGE = 4096;

const char *errnoName(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case EINVAL: return "EINVAL";
    case EMFILE: return "EMFILE";
    case ENOTTY: return "ENOTTY";
    case ENOSPC: return "ENOSPC";
    case ERANGE: return "ERANGE";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EALREADY: return "EALREADY";
    case EOVERFLOW: return "EOVERFLOW";
    default: return nullptr;
  }
}

Napi::Value throwErrno(Napi::Env env, int e, const std::string &syscall) {
  const char *name = errnoName(e);
  std::string code = name ? name : ("ERRNO_" + std::to_string(e));
  Napi::Error err = Napi::Error::New(env, syscall + ": " + code + " (" + strerror(e) + ")");
  err.Set("code", Napi::String::New(env, code));
  err.Set("errno", Napi::Number::New(env, e));
  err.Set("syscall", Napi::String::New(env, syscall));
  err.ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value throwArg(Napi::Env env, const std::string &msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool getU64(const Napi::Value &v, uint64_t *out) {
  if (!v.IsBigInt()) return false;
  bool lossless = false;
  *out = v.As<Napi::BigInt>().Uint64Value(&lossless);
  return lossless;
}

bool getBytes(const Napi::Value &v, size_t len, const uint8_t **out) {
  if (!v.IsTypedArray()) return false;
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_uint8_array || ta.ByteLength() != len) return false;
  Napi::Uint8Array u = v.As<Napi::Uint8Array>();
  *out = u.Data();
  return true;
}

enum Kind { KIND_V1_PAGE = 1, KIND_V2_REGION = 2, KIND_LOCAL = 3 };

struct Mapping {
  void *addr;
  size_t len;
  Kind kind;
  uint64_t key;  // v1: gva; v2: the region's start gpa; local: the address
  Napi::Reference<Napi::ArrayBuffer> ref;  // weak: detached on unmap if still alive
};

class Device : public Napi::ObjectWrap<Device> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "KvmmemHandle",
                       {
                           InstanceMethod("probe", &Device::Probe),
                           InstanceMethod("v1Map", &Device::V1Map),
                           InstanceMethod("v1Unmap", &Device::V1Unmap),
                           InstanceMethod("v2Open", &Device::V2Open),
                           InstanceMethod("v2Map", &Device::V2Map),
                           InstanceMethod("v2Unmap", &Device::V2Unmap),
                           InstanceMethod("reservePage", &Device::ReservePage),
                           InstanceMethod("mapFile", &Device::MapFile),
                           InstanceMethod("release", &Device::Release),
                           InstanceMethod("close", &Device::Close),
                           InstanceMethod("stats", &Device::Stats),
                       });
  }

  // new KvmmemHandle(path?: string): open the device (O_RDWR | O_CLOEXEC), or no device at all (the
  // simulated path: only the local mapping primitives).
  explicit Device(const Napi::CallbackInfo &info) : Napi::ObjectWrap<Device>(info) {
    Napi::Env env = info.Env();
    if (info.Length() > 0 && info[0].IsString()) {
      std::string path = info[0].As<Napi::String>().Utf8Value();
      fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd_ < 0) {
        throwErrno(env, errno, "open " + path);
        return;
      }
    }
  }

  ~Device() override {
    // The JS object is gone: nothing can reach the buffers through it any more, but they may still be
    // alive. Unmapping here would leave live ArrayBuffers pointing at unmapped memory, so the memory is
    // left mapped (and the fd open) until the process ends, unless close() ran.
  }

 private:
  int fd_ = -1;
  bool closed_ = false;
  std::map<uintptr_t, Mapping> maps_;  // keyed by local address
  size_t bytes_ = 0;

  bool checkOpen(Napi::Env env, bool needDevice) {
    if (closed_) {
      throwErrno(env, EBADF, "kvmmem handle closed");
      return false;
    }
    if (needDevice && fd_ < 0) {
      throwErrno(env, EBADF, "no /dev/kvmmem descriptor (simulated handle)");
      return false;
    }
    return true;
  }

  Napi::Object expose(Napi::Env env, void *addr, size_t len, Kind kind, uint64_t key) {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, addr, len, [](Napi::Env, void *) {});
    Mapping m{addr, len, kind, key, Napi::Reference<Napi::ArrayBuffer>::New(ab, 0)};
    maps_.emplace(reinterpret_cast<uintptr_t>(addr), std::move(m));
    bytes_ += len;
    Napi::Object o = Napi::Object::New(env);
    o.Set("address", Napi::BigInt::New(env, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(addr))));
    o.Set("buffer", ab);
    return o;
  }

  static void detach(Mapping &m) {
    if (!m.ref.IsEmpty()) {
      Napi::ArrayBuffer ab = m.ref.Value();
      if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
      m.ref.Reset();
    }
  }

  void forget(std::map<uintptr_t, Mapping>::iterator it) {
    detach(it->second);
    bytes_ -= it->second.len;
    maps_.erase(it);
  }

  std::map<uintptr_t, Mapping>::iterator findKey(Kind kind, uint64_t key) {
    for (auto it = maps_.begin(); it != maps_.end(); ++it) {
      if (it->second.kind == kind && it->second.key == key) return it;
    }
    return maps_.end();
  }

  // probe(): libkvmi's detection (§4.3): ioctl(KVM_GUEST_MEM_UNMAP, 0); ENOTTY → v1, anything else → v2.
  Napi::Value Probe(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    int r = ::ioctl(fd_, KVM_GUEST_MEM_UNMAP, 0UL);
    int e = r < 0 ? errno : 0;
    Napi::Object o = Napi::Object::New(env);
    o.Set("abi", Napi::Number::New(env, (r < 0 && e == ENOTTY) ? 1 : 2));
    o.Set("errno", Napi::Number::New(env, e));
    return o;
  }

  // v1Map(token: Uint8Array(32), gpa: bigint) → { address, buffer } (§3.4): a resident page-aligned local
  // page, then KVM_INTRO_MEM_MAP {token, gpa, gva = the page}. On failure the page is unmapped.
  Napi::Value V1Map(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    const uint8_t *token;
    uint64_t gpa;
    if (info.Length() < 2 || !getBytes(info[0], 32, &token) || !getU64(info[1], &gpa)) {
      return throwArg(env, "v1Map(token: Uint8Array(32), gpa: bigint)");
    }
    void *page = ::mmap(nullptr, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);
    if (page == MAP_FAILED && (errno == EAGAIN || errno == EPERM)) {
      // RLIMIT_MEMLOCK: the module pins the page itself (get_user_pages), so locking is only an optimisation.
      page = ::mmap(nullptr, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    }
    if (page == MAP_FAILED) return throwErrno(env, errno, "mmap");
    kvmi_mem_map m;
    memcpy(&m.token, token, sizeof m.token);
    m.gpa = gpa;
    m.gva = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(page));
    if (::ioctl(fd_, KVM_INTRO_MEM_MAP, &m) < 0) {
      int e = errno;
      ::munmap(page, PAGE);
      return throwErrno(env, e, "ioctl KVM_INTRO_MEM_MAP");
    }
    return expose(env, page, PAGE, KIND_V1_PAGE, m.gva);
  }

  // v1Unmap(gva: bigint): ioctl(KVM_INTRO_MEM_UNMAP, gva) by value, then munmap + detach when it is one
  // of ours (the module drops the entry in every case). An address we never mapped still goes to the
  // device, which answers ENOENT.
  Napi::Value V1Unmap(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    uint64_t gva;
    if (info.Length() < 1 || !getU64(info[0], &gva)) return throwArg(env, "v1Unmap(gva: bigint)");
    int r = ::ioctl(fd_, KVM_INTRO_MEM_UNMAP, static_cast<unsigned long>(gva));
    int e = r < 0 ? errno : 0;
    auto it = maps_.find(static_cast<uintptr_t>(gva));
    if (it != maps_.end() && it->second.kind == KIND_V1_PAGE) {
      ::munmap(it->second.addr, it->second.len);
      forget(it);
    }
    if (r < 0) return throwErrno(env, e, "ioctl KVM_INTRO_MEM_UNMAP");
    return env.Undefined();
  }

  // v2Open(uuid: Uint8Array(16)): KVM_GUEST_MEM_OPEN with a pointer to the 16 bytes.
  Napi::Value V2Open(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    const uint8_t *uuid;
    if (info.Length() < 1 || !getBytes(info[0], 16, &uuid)) return throwArg(env, "v2Open(uuid: Uint8Array(16))");
    unsigned char copy[16];
    memcpy(copy, uuid, 16);
    if (::ioctl(fd_, KVM_GUEST_MEM_OPEN, copy) < 0) return throwErrno(env, errno, "ioctl KVM_GUEST_MEM_OPEN");
    return env.Undefined();
  }

  // v2Map(token: Uint8Array(32), gpa: bigint) → { start, length, address, buffer } (§4.4): the module
  // answers the region containing gpa; mmap(MAP_SHARED, offset = start); when mmap fails, UNMAP(start).
  Napi::Value V2Map(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    const uint8_t *token;
    uint64_t gpa;
    if (info.Length() < 2 || !getBytes(info[0], 32, &token) || !getU64(info[1], &gpa)) {
      return throwArg(env, "v2Map(token: Uint8Array(32), gpa: bigint)");
    }
    kvmi_guest_mem_map m;
    memcpy(&m.token, token, sizeof m.token);
    m.gpa = gpa;
    m.length = 0;
    if (::ioctl(fd_, KVM_GUEST_MEM_MAP, &m) < 0) return throwErrno(env, errno, "ioctl KVM_GUEST_MEM_MAP");
    uint64_t start = m.gpa, length = m.length;
    int e = 0;
    void *addr = MAP_FAILED;
    if (length == 0 || length > SIZE_MAX || (length & (PAGE - 1)) != 0 || (start & (PAGE - 1)) != 0) {
      e = EINVAL;  // a region the module could not have produced; give it back
    } else {
      // MAP_POPULATE: the region is about to be read page by page; fault it in with one call.
      addr = ::mmap(nullptr, static_cast<size_t>(length), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, static_cast<off_t>(start));
      if (addr == MAP_FAILED) e = errno;
    }
    if (addr == MAP_FAILED) {
      ::ioctl(fd_, KVM_GUEST_MEM_UNMAP, static_cast<unsigned long>(start));
      return throwErrno(env, e, "mmap");
    }
    Napi::Object o = expose(env, addr, static_cast<size_t>(length), KIND_V2_REGION, start);
    o.Set("start", Napi::BigInt::New(env, start));
    o.Set("length", Napi::BigInt::New(env, length));
    return o;
  }

  // v2Unmap(start: bigint): munmap our view (the module refuses to unmap a region still mmapped), then
  // ioctl(KVM_GUEST_MEM_UNMAP, start) by value.
  Napi::Value V2Unmap(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, true)) return env.Undefined();
    uint64_t start;
    if (info.Length() < 1 || !getU64(info[0], &start)) return throwArg(env, "v2Unmap(start: bigint)");
    auto it = findKey(KIND_V2_REGION, start);
    if (it != maps_.end()) {
      ::munmap(it->second.addr, it->second.len);
      forget(it);
    }
    if (::ioctl(fd_, KVM_GUEST_MEM_UNMAP, static_cast<unsigned long>(start)) < 0) {
      return throwErrno(env, errno, "ioctl KVM_GUEST_MEM_UNMAP");
    }
    return env.Undefined();
  }

  // reservePage() → { address, buffer }: an anonymous page-aligned page (the simulated ABI v1's gva).
  Napi::Value ReservePage(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, false)) return env.Undefined();
    void *page = ::mmap(nullptr, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return throwErrno(env, errno, "mmap");
    return expose(env, page, PAGE, KIND_LOCAL, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(page)));
  }

  // mapFile(path: string, offset: bigint, length: number, at?: bigint) → { address, buffer }: map a file
  // range MAP_SHARED (the simulated device's pages: the VM's RAM file, offset = GPA). With `at` (a
  // reserved page of this handle of the same length), the file replaces that page in place (MAP_FIXED)
  // and its existing buffer stays valid.
  Napi::Value MapFile(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, false)) return env.Undefined();
    uint64_t offset, at = 0;
    if (info.Length() < 3 || !info[0].IsString() || !getU64(info[1], &offset) || !info[2].IsNumber()) {
      return throwArg(env, "mapFile(path: string, offset: bigint, length: number, at?: bigint)");
    }
    int64_t len64 = info[2].As<Napi::Number>().Int64Value();
    bool fixed = info.Length() > 3 && !info[3].IsUndefined();
    if (fixed && !getU64(info[3], &at)) return throwArg(env, "mapFile: at must be a bigint");
    if (len64 <= 0 || (len64 & (PAGE - 1)) != 0 || (offset & (PAGE - 1)) != 0) return throwErrno(env, EINVAL, "mmap");
    size_t len = static_cast<size_t>(len64);
    std::map<uintptr_t, Mapping>::iterator slot = maps_.end();
    if (fixed) {
      slot = maps_.find(static_cast<uintptr_t>(at));
      if (slot == maps_.end() || slot->second.kind != KIND_LOCAL || slot->second.len != len) return throwErrno(env, EINVAL, "mmap MAP_FIXED");
    }
    std::string path = info[0].As<Napi::String>().Utf8Value();
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return throwErrno(env, errno, "open " + path);
    void *hint = fixed ? reinterpret_cast<void *>(static_cast<uintptr_t>(at)) : nullptr;
    void *addr = ::mmap(hint, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE | (fixed ? MAP_FIXED : 0), fd, static_cast<off_t>(offset));
    int e = errno;
    ::close(fd);
    if (addr == MAP_FAILED) return throwErrno(env, e, "mmap");
    if (fixed) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("address", Napi::BigInt::New(env, at));
      Napi::ArrayBuffer ab = slot->second.ref.IsEmpty() ? Napi::ArrayBuffer() : slot->second.ref.Value();
      o.Set("buffer", ab.IsEmpty() ? env.Null() : static_cast<Napi::Value>(ab));
      return o;
    }
    return expose(env, addr, len, KIND_LOCAL, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(addr)));
  }

  // release(address: bigint): munmap a local mapping (reservePage / mapFile) and detach its buffer.
  // ENOENT when the address is not one of this handle's local mappings.
  Napi::Value Release(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (!checkOpen(env, false)) return env.Undefined();
    uint64_t address;
    if (info.Length() < 1 || !getU64(info[0], &address)) return throwArg(env, "release(address: bigint)");
    auto it = maps_.find(static_cast<uintptr_t>(address));
    if (it == maps_.end() || it->second.kind != KIND_LOCAL) return throwErrno(env, ENOENT, "release");
    ::munmap(it->second.addr, it->second.len);
    forget(it);
    return env.Undefined();
  }

  // close(): unmap everything (v1: UNMAP then munmap; v2: munmap then UNMAP; local: munmap), detach every
  // buffer, close the descriptor (the module's release would unmap what is left anyway). Idempotent.
  Napi::Value Close(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    if (closed_) return env.Undefined();
    closed_ = true;
    for (auto &kv : maps_) {
      Mapping &m = kv.second;
      detach(m);
      if (m.kind == KIND_V1_PAGE) {
        ::ioctl(fd_, KVM_INTRO_MEM_UNMAP, static_cast<unsigned long>(m.key));
        ::munmap(m.addr, m.len);
      } else if (m.kind == KIND_V2_REGION) {
        ::munmap(m.addr, m.len);
        ::ioctl(fd_, KVM_GUEST_MEM_UNMAP, static_cast<unsigned long>(m.key));
      } else {
        ::munmap(m.addr, m.len);
      }
    }
    maps_.clear();
    bytes_ = 0;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    return env.Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo &info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("mappings", Napi::Number::New(env, static_cast<double>(maps_.size())));
    o.Set("bytes", Napi::Number::New(env, static_cast<double>(bytes_)));
    o.Set("closed", Napi::Boolean::New(env, closed_));
    o.Set("fd", Napi::Number::New(env, fd_));
    return o;
  }
};

// sha256Chunks(view: Uint8Array, chunkSize: number) → Buffer of 32-byte digests, one per chunk of the view
// (the last chunk may be shorter). Reads only through the view, whose bounds V8 keeps: a view of a
// detached (unmapped) buffer has length 0 and yields no digest. One call per mapped segment instead of one
// hash object per page: the per-call cost is what makes page-granular hashing slow in JavaScript.
Napi::Value Sha256Chunks(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsNumber()) return throwArg(env, "sha256Chunks(view: Uint8Array, chunkSize: number)");
  Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_uint8_array) return throwArg(env, "sha256Chunks: view must be a Uint8Array");
  int64_t chunk = info[1].As<Napi::Number>().Int64Value();
  if (chunk <= 0) return throwArg(env, "sha256Chunks: chunkSize must be positive");
  Napi::Uint8Array u = info[0].As<Napi::Uint8Array>();
  const uint8_t *data = u.Data();
  size_t len = u.ByteLength();
  size_t n = len == 0 ? 0 : (len + static_cast<size_t>(chunk) - 1) / static_cast<size_t>(chunk);
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, n * 32);
  for (size_t i = 0; i < n; i++) {
    size_t off = i * static_cast<size_t>(chunk);
    size_t take = len - off < static_cast<size_t>(chunk) ? len - off : static_cast<size_t>(chunk);
    SHA256(data + off, take, out.Data() + i * 32);
  }
  return out;
}

// sha256Segments(views: Uint8Array[], chunkSize: number) → Buffer: the digests of consecutive chunks of the
// concatenated views, which must be cut at chunk boundaries (every view but the last a multiple of
// chunkSize; TypeError otherwise). One call for a batch of discontiguous pages (ABI v1) or regions.
Napi::Value Sha256Segments(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsNumber()) return throwArg(env, "sha256Segments(views: Uint8Array[], chunkSize: number)");
  Napi::Array views = info[0].As<Napi::Array>();
  int64_t chunk64 = info[1].As<Napi::Number>().Int64Value();
  if (chunk64 <= 0) return throwArg(env, "sha256Segments: chunkSize must be positive");
  size_t chunk = static_cast<size_t>(chunk64);
  uint32_t count = views.Length();
  std::vector<std::pair<const uint8_t *, size_t>> segs;
  segs.reserve(count);
  size_t digests = 0;
  for (uint32_t i = 0; i < count; i++) {
    Napi::Value v = views.Get(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) return throwArg(env, "sha256Segments: views must be Uint8Arrays");
    Napi::Uint8Array u = v.As<Napi::Uint8Array>();
    size_t len = u.ByteLength();
    if (i + 1 < count && len % chunk != 0) return throwArg(env, "sha256Segments: a view other than the last is not a multiple of chunkSize");
    segs.emplace_back(u.Data(), len);
    digests += (len + chunk - 1) / chunk;
  }
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, digests * 32);
  uint8_t *o = out.Data();
  for (auto &sg : segs) {
    for (size_t off = 0; off < sg.second; off += chunk) {
      size_t take = sg.second - off < chunk ? sg.second - off : chunk;
      SHA256(sg.first + off, take, o);
      o += 32;
    }
  }
  return out;
}

// sha256SegmentsAsync(views, chunkSize) → Promise<Buffer>: the same on a libuv worker thread, so that two
// batches hash on two cores. The views are referenced until the work ends; the caller must not unmap their
// memory before the promise settles (VmMemorySession.close waits for its hashing to finish).
class HashWorker : public Napi::AsyncWorker {
 public:
  HashWorker(Napi::Env env, std::vector<std::pair<const uint8_t *, size_t>> segs, size_t chunk, size_t digests, Napi::Array views)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), segs_(std::move(segs)), chunk_(chunk), out_(digests * 32) {
    views_ = Napi::Persistent(views.As<Napi::Object>());
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    uint8_t *o = out_.data();
    for (auto &sg : segs_) {
      for (size_t off = 0; off < sg.second; off += chunk_) {
        size_t take = sg.second - off < chunk_ ? sg.second - off : chunk_;
        SHA256(sg.first + off, take, o);
        o += 32;
      }
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    deferred_.Resolve(Napi::Buffer<uint8_t>::Copy(env, out_.data(), out_.size()));
    views_.Reset();
  }
  void OnError(const Napi::Error &e) override {
    deferred_.Reject(e.Value());
    views_.Reset();
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::vector<std::pair<const uint8_t *, size_t>> segs_;
  size_t chunk_;
  std::vector<uint8_t> out_;
  Napi::ObjectReference views_;
};

Napi::Value Sha256SegmentsAsync(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsNumber()) return throwArg(env, "sha256SegmentsAsync(views: Uint8Array[], chunkSize: number)");
  Napi::Array views = info[0].As<Napi::Array>();
  int64_t chunk64 = info[1].As<Napi::Number>().Int64Value();
  if (chunk64 <= 0) return throwArg(env, "sha256SegmentsAsync: chunkSize must be positive");
  size_t chunk = static_cast<size_t>(chunk64);
  uint32_t count = views.Length();
  std::vector<std::pair<const uint8_t *, size_t>> segs;
  size_t digests = 0;
  for (uint32_t i = 0; i < count; i++) {
    Napi::Value v = views.Get(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) return throwArg(env, "sha256SegmentsAsync: views must be Uint8Arrays");
    Napi::Uint8Array u = v.As<Napi::Uint8Array>();
    size_t len = u.ByteLength();
    if (i + 1 < count && len % chunk != 0) return throwArg(env, "sha256SegmentsAsync: a view other than the last is not a multiple of chunkSize");
    segs.emplace_back(u.Data(), len);
    digests += (len + chunk - 1) / chunk;
  }
  HashWorker *w = new HashWorker(env, std::move(segs), chunk, digests, views);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("sha256SegmentsAsync", Napi::Function::New(env, Sha256SegmentsAsync, "sha256SegmentsAsync"));
  exports.Set("sha256Chunks", Napi::Function::New(env, Sha256Chunks, "sha256Chunks"));
  exports.Set("sha256Segments", Napi::Function::New(env, Sha256Segments, "sha256Segments"));
  exports.Set("KvmmemHandle", Device::Init(env));
  Napi::Object req = Napi::Object::New(env);
  req.Set("KVM_INTRO_MEM_MAP", Napi::Number::New(env, static_cast<double>(KVM_INTRO_MEM_MAP)));
  req.Set("KVM_INTRO_MEM_UNMAP", Napi::Number::New(env, static_cast<double>(KVM_INTRO_MEM_UNMAP)));
  req.Set("KVM_GUEST_MEM_OPEN", Napi::Number::New(env, static_cast<double>(KVM_GUEST_MEM_OPEN)));
  req.Set("KVM_GUEST_MEM_MAP", Napi::Number::New(env, static_cast<double>(KVM_GUEST_MEM_MAP)));
  req.Set("KVM_GUEST_MEM_UNMAP", Napi::Number::New(env, static_cast<double>(KVM_GUEST_MEM_UNMAP)));
  exports.Set("requests", req);
  exports.Set("pageSize", Napi::Number::New(env, static_cast<double>(PAGE)));
  return exports;
}

}  // namespace

NODE_API_MODULE(kvmmem, Init)
