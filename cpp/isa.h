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

}  // namespace fastrec
