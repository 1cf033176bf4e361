// CPU feature detection: CPUID for the instruction sets plus XGETBV for the OS saving the registers.
#include "isa.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "common.h"

namespace fastrec {

namespace {

#if defined(__x86_64__) && defined(FASTREC_HAVE_X86_KERNELS)
unsigned long long read_xcr0() {
  unsigned eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
  bool avx512_bf16 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;         // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;       // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  // CPUID.(7, 1):EAX bit 5: VDPBF16PS / VCVTNE2PS2BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later).
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
  return f;
}
#endif

std::vector<Isa> detect_available() {
  std::vector<Isa> out{Isa::Scalar};
#if defined(__x86_64__) && defined(FASTREC_HAVE_X86_KERNELS)
  const CpuFeatures f = detect();
  if (f.avx2) out.push_back(Isa::Avx2);
  if (f.avx512) out.push_back(Isa::Avx512);
#endif
  return out;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  throw std::invalid_argument("isa must be 'auto', 'avx512', 'avx2' or 'scalar', got '" + name + "'");
}

std::vector<Isa> compiled_isas() {
#ifdef FASTREC_HAVE_X86_KERNELS
  return {Isa::Scalar, Isa::Avx2, Isa::Avx512};
#else
  return {Isa::Scalar};
#endif
}

std::vector<Isa> available_isas() {
  static const std::vector<Isa> available = detect_available();  // detected once, thread-safe init
  return available;
}

Isa best_isa() {
  static const Isa best = [] {
    Isa isa = available_isas().back();
    if (const char* env = std::getenv("FASTREC_ISA")) {
      const std::string cap(env);
      if (!cap.empty() && cap != "auto") {
        // An unknown value is ignored rather than failing every call; show_config reports the choice.
        try {
          const Isa wanted = parse_isa(cap);
          if (static_cast<int>(wanted) < static_cast<int>(isa)) isa = wanted;
        } catch (const std::invalid_argument&) {
        }
      }
    }
    return isa;
  }();
  return best;
}

Isa resolve_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  const Isa isa = parse_isa(name);
  for (Isa a : available_isas())
    if (a == isa) return isa;
  throw std::invalid_argument(std::string("isa '") + name + "' is not available on this CPU or build");
}

bool bf16_native_available() {
#if defined(__x86_64__) && defined(FASTREC_HAVE_X86_KERNELS) && defined(FASTREC_HAVE_BF16_KERNELS)
  static const bool cpu = detect().avx512_bf16;
  return cpu && best_isa() == Isa::Avx512;
#else
  return false;
#endif
}

std::vector<std::string> bf16_kernels() {
  std::vector<std::string> out{"emulated"};
  if (bf16_native_available()) out.push_back("avx512_bf16");
  return out;
}

bool resolve_bf16_kernel(const std::string& name, Isa isa) {
  if (name == "auto") return bf16_native_available() && isa == Isa::Avx512;
  if (name == "emulated") return false;
  if (name == "avx512_bf16") {
    if (!bf16_native_available() || isa != Isa::Avx512)
      throw std::invalid_argument("bf16 kernel 'avx512_bf16' is not available on this CPU or build (or the ISA "
                                  "asked for, or FASTREC_ISA, is below avx512)");
    return true;
  }
  throw std::invalid_argument("bf16 kernel must be 'auto', 'avx512_bf16' or 'emulated', got '" + name + "'");
}

Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::Identity;
  if (name == "logistic") return Activation::Logistic;
  if (name == "tanh") return Activation::Tanh;
  if (name == "relu") return Activation::Relu;
  if (name == "softmax") return Activation::Softmax;
  throw std::invalid_argument("activation must be one of 'identity', 'logistic', 'tanh', 'relu', 'softmax', got '" +
                              name + "'");
}

}  // namespace fastrec
