#pragma once
// effattn::Error and the O(1) argument checks every public entry point runs.

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace effattn {

/// The one exception type the library throws for bad input or configuration.
/// Its message reads "effattn: <component>: argument '<argument>' is <given>; expected
/// <expected>", and the component and argument are also available on their own so a
/// caller can react to them without parsing text.
class Error : public std::invalid_argument {
 public:
  Error(std::string component, std::string argument, const std::string& given,
        const std::string& expected)
      : std::invalid_argument("effattn: " + component + ": argument '" + argument + "' is " +
                              given + "; expected " + expected),
        component_(std::move(component)),
        argument_(std::move(argument)) {}

  const std::string& component() const noexcept { return component_; }
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string component_;
  std::string argument_;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws when `ok` is false. `given` and `expected` are only formatted on failure,
/// so the check costs one branch on the good path.
template <class Given, class Expected>
inline void require(bool ok, std::string_view component, std::string_view argument,
                    const Given& given, const Expected& expected) {
  if (ok) [[likely]]
    return;
  throw Error(std::string(component), std::string(argument), concat(given), concat(expected));
}

}  // namespace detail
}  // namespace effattn
