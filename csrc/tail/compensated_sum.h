// Compensated (Neumaier) summation for the tail log sums. Plain recursive summation of k terms
// can err by ~k eps times the sum, and does so systematically when many terms are equal (ties:
// measured 1e-13 relative on 1.7e6 tied terms, beyond the few-ulp bound the tests hold the
// library to); the compensation term carries each addition's rounding error.
#pragma once
#include <cmath>

namespace gradience::tail {

struct CompensatedSum {
  double sum = 0.0;
  double comp = 0.0;
  inline void add(double y) {
    const double t = sum + y;
    comp += std::fabs(sum) >= std::fabs(y) ? (sum - t) + y : (y - t) + sum;
    sum = t;
  }
  // Fast2Sum: exact error term when |sum| >= |y| (or sum == 0). The tail sums add terms
  // y >= -1e-15 (logs above the reference edge) to running sums of such terms, which meets the
  // condition but for a first few tiny terms; 4 flops instead of Neumaier's 6 and a branch.
  inline void add_nonnegative(double y) {
    const double t = sum + y;
    comp += (sum - t) + y;
    sum = t;
  }
  inline void add(const CompensatedSum& other) {
    add(other.sum);
    add(other.comp);
  }
  inline double value() const { return sum + comp; }
};

}  // namespace gradience::tail
