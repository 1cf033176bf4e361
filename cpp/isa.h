// Run-time choice of SIMD kernels: what was compiled, what this CPU and OS support, and FASTREC_ISA.
#pragma once
#include <string>
#include <vector>

namespace fastrec {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);        // "scalar" | "avx2" | "avx512"; throws std::invalid_argument
std::vector<Isa> compiled_isas();               // kernels built into this binary
std::vector<Isa> available_isas();              // compiled AND supported by this CPU/OS (detected once)
Isa best_isa();                                 // best available, capped by FASTREC_ISA when set
// "auto" -> best_isa(); a named ISA must be available, else std::invalid_argument.
Isa resolve_isa(const std::string& name);

// bfloat16 products (gemm.h, bf16_gemm): the AVX512-BF16 kernel (VDPBF16PS) when it was compiled, the CPU has
// avx512_bf16 and AVX-512 is available and not capped by FASTREC_ISA; otherwise "emulated" (the float32 kernels
// on operands rounded to bf16 while packing: any CPU). bf16_kernels(): the available names, "emulated" first.
bool bf16_native_available();
std::vector<std::string> bf16_kernels();
// "auto" -> the AVX512-BF16 kernel when available; "avx512_bf16" (must be available, else
// std::invalid_argument) -> true; "emulated" -> false.
bool resolve_bf16_kernel(const std::string& name, Isa isa);  // isa: the resolved ISA of the call

}  // namespace fastrec
