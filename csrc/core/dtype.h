// The floating-point element types the kernels take, named without torch's dtype enum (launchers and
// kernels never include torch headers).
#pragma once

namespace fastar {

enum class FloatKind { kFloat32, kFloat16, kBFloat16 };

}  // namespace fastar
