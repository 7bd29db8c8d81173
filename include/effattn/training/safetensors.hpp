#pragma once
// Checkpoints in the safetensors format: save and load every parameter of a model by path.
//
// Needs nlohmann/json (Debian: nlohmann-json3-dev) for the header; the rest of effattn does not.

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "effattn/attention/random_state.hpp"
#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"
#include "effattn/layers/detail/composition.hpp"
#include "effattn/training/detail/parameter_states.hpp"

namespace effattn {

/// The safetensors file format (https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length N, a JSON header of N bytes mapping each tensor name to
/// {"dtype", "shape", "data_offsets": [begin, end)} (offsets into the data that follows),
/// then the tensors' raw little-endian bytes. Files written here open in PyTorch
/// (safetensors.torch.load_file) and NumPy tooling. Names are parameter paths
/// (layers/parameter_paths.hpp); every tensor is stored with its matrix shape [rows, cols]
/// (a bias is [1, d]); dtype F32 for float, F64 for double. "__metadata__" says
/// {"format": "effattn"}.
namespace safetensors {

static_assert(std::endian::native == std::endian::little,
              "effattn: the safetensors functions assume a little-endian machine");

namespace detail {

template <class S>
constexpr const char* dtype() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "effattn: safetensors stores float (F32) or double (F64) parameters");
  return std::is_same_v<S, float> ? "F32" : "F64";
}

struct Tensor {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

// Every parameter of the models, in visiting order: path, value.
template <class... Models>
auto parameters(Models&... models) {
  using S = std::common_type_t<typename Models::Scalar...>;
  std::vector<std::pair<std::string, Matrix<S>*>> all;
  auto collect = [&](std::string_view path, auto& value, auto&) {
    static_assert(std::is_same_v<std::decay_t<decltype(value)>, Matrix<S>>,
                  "effattn: models saved to one file share one scalar type");
    all.emplace_back(std::string(path), &value);
  };
  (models.visit_parameters(collect), ...);
  return all;
}

// Every policy with random state in the models, in visiting order: its path and its
// random_state(), and a function that sets it.
template <class S>
struct RandomPart {
  std::string path;
  RandomState<S> state;  // as the model has it now
  std::function<std::string(const RandomState<S>&)> check;
  std::function<void(const RandomState<S>&)> set;
  std::function<bool(const std::string&)> claims;
};
// The names a random state has in a checkpoint: its tensors, then its seed.
template <class S>
std::vector<std::string> state_names(const std::string& path, const RandomState<S>& state) {
  std::vector<std::string> names;
  for (const auto& [name, value] : state.tensors)
    names.push_back(effattn::detail::join_path(path, name));
  if (state.seed) names.push_back(effattn::detail::join_path(path, "seed"));
  return names;
}
template <class... Models>
auto random_parts(Models&... models) {
  using S = std::common_type_t<typename Models::Scalar...>;
  std::vector<RandomPart<S>> all;
  auto collect = [&](std::string_view path, auto& policy) {
    all.push_back(
        {std::string(path), policy.random_state(),
         [&policy](const RandomState<S>& s) { return policy.check_random_state(s); },
         [&policy](const RandomState<S>& s) { policy.set_random_state(s); },
         [&policy](const std::string& name) { return policy.claims_random_tensor(name); }});
  };
  (effattn::detail::visit_random_state_of(models, "", collect), ...);
  return all;
}

}  // namespace detail

namespace detail {

using effattn::detail::concat;
using effattn::detail::require;

inline constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t(100) << 20;

// Writes `tensors` (name, matrix) and `metadata` to path through a temporary file.
template <class S>
void write(const std::filesystem::path& path, const char* who,
           const std::vector<std::pair<std::string, const Matrix<S>*>>& tensors,
           const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  std::uint64_t offset = 0;
  for (const auto& [name, value] : tensors) {
    require(!header.contains(name) && name != "__metadata__", who, "models",
            concat("two tensors named '", name, "'"), "one path per parameter");
    const std::uint64_t bytes = sizeof(S) * std::uint64_t(value->size());
    header[name] = {{"dtype", dtype<S>()},
                    {"shape", {value->rows(), value->cols()}},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  header["__metadata__"] = {{"format", "effattn"}};
  for (const auto& [key, value] : metadata)
    header["__metadata__"][key] = value;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::filesystem::path temporary = path;
  temporary += ".partial";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    require(bool(out), who, "path", path.string(), "a file that can be written");
    const std::uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), sizeof n);
    out.write(text.data(), std::streamsize(text.size()));
    for (const auto& [name, value] : tensors)
      out.write(reinterpret_cast<const char*>(value->data()),
                std::streamsize(sizeof(S) * std::size_t(value->size())));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      require(false, who, "path", path.string(),
              "a file that can be written to the end (disk full?)");
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  require(!error, who, "path", path.string(),
          concat("a path the file can be moved to (", error.message(), ")"));
}

// A safetensors header read by a SAX handler: no JSON tree is built (memory stays within a
// small multiple of the header's bytes, whatever it holds), nesting deeper than
// kMaxHeaderDepth stops the parse, and each error names the tensor and the field.
inline constexpr int kMaxHeaderDepth = 128;        // as the reference (Rust) implementation
inline constexpr std::size_t kMaxShownBytes = 80;  // of a name or value quoted in an error
inline constexpr std::size_t kMaxDimensions = 64;  // of a tensor's shape

// `text` quoted for an error message, at most kMaxShownBytes of it.
inline std::string shown(std::string_view text) {
  if (text.size() <= kMaxShownBytes) return std::string(text);
  return concat(text.substr(0, kMaxShownBytes), "… (", text.size(), " bytes)");
}

// Bytes per element of the safetensors dtypes; 0 for a dtype this file does not know.
inline std::uint64_t dtype_bytes(std::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2")
    return 1;
  return 0;
}

struct HeaderError {
  std::string argument, given, expected;
};

// The header's tensors and string metadata; the first error stops the parse.
class HeaderReader {
 public:
  using json = nlohmann::json;
  std::map<std::string, Tensor, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;
  std::optional<HeaderError> error;

  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(json::number_integer_t v) {
    if (v < 0) return scalar(concat("the number ", v));
    return number_unsigned(json::number_unsigned_t(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (depth_ == 3 && field_ == Field::shape) {
      if (shape_.size() < kMaxDimensions)
        shape_.push_back(v);
      else
        fail_entry("shape", concat("more than ", kMaxDimensions, " sizes"),
                   concat("at most ", kMaxDimensions, " dimensions"));
      return !error;
    }
    if (depth_ == 3 && field_ == Field::offsets) {
      if (offsets_.size() < 2)
        offsets_.push_back(v);
      else
        fail_entry("data_offsets", "more than two numbers", "[begin, end]");
      return !error;
    }
    return scalar(concat("the number ", v));
  }
  bool number_float(json::number_float_t, const json::string_t& text) {
    return scalar(concat("the number ", shown(text)));
  }
  bool string(json::string_t& s) {
    if (depth_ == 2 && in_metadata_ && metadata_object_) {
      metadata[key_] = std::move(s);
      return true;
    }
    if (depth_ == 2 && field_ == Field::dtype) {
      dtype_ = std::move(s);
      has_dtype_ = true;
      return true;
    }
    return scalar(concat("the string \"", shown(s), "\""));
  }
  bool binary(json::binary_t&) { return scalar("binary"); }

  bool start_object(std::size_t) {
    if (!enter()) return false;
    if (depth_ == 1) return true;        // the header
    if (depth_ == 2 && !in_metadata_) {  // a tensor's entry
      dtype_.clear();
      shape_.clear();
      offsets_.clear();
      has_dtype_ = has_shape_ = false;
      return true;
    }
    if (depth_ == 2) {  // __metadata__
      metadata_object_ = true;
      return true;
    }
    return skipped_value("an object");
  }
  bool end_object() {
    if (depth_ == 2 && !in_metadata_) finish_entry();
    if (depth_ == 2) in_metadata_ = metadata_object_ = false;
    leave();
    return !error;
  }
  bool start_array(std::size_t) {
    if (!enter()) return false;
    if (depth_ == 3 && field_ == Field::shape) {
      has_shape_ = true;
      shape_.clear();
      return true;
    }
    if (depth_ == 3 && field_ == Field::offsets) {
      offsets_.clear();
      return true;
    }
    return skipped_value("an array");
  }
  bool end_array() {
    leave();
    return true;
  }
  bool key(json::string_t& k) {
    if (depth_ == 1) {
      in_metadata_ = k == "__metadata__";
      if (!in_metadata_) {
        if (tensors.contains(k)) {
          error = HeaderError{concat("tensor '", shown(k), "'"), "named twice in the header",
                              "one entry per tensor"};
          return false;
        }
        name_ = std::move(k);
      }
      return true;
    }
    if (depth_ == 2 && in_metadata_) key_ = std::move(k);
    if (depth_ == 2 && !in_metadata_)
      field_ = k == "dtype"          ? Field::dtype
               : k == "shape"        ? Field::shape
               : k == "data_offsets" ? Field::offsets
                                     : Field::other;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::json::exception&) {
    if (!error)
      error = HeaderError{"header", concat("not valid JSON (at byte ", position, ")"),
                          "the JSON object of a safetensors file"};
    return false;
  }

 private:
  enum class Field { other, dtype, shape, offsets };

  bool enter() {
    if (++depth_ <= kMaxHeaderDepth) return true;
    error = HeaderError{"header", concat("nested deeper than ", kMaxHeaderDepth, " levels"),
                        concat("at most ", kMaxHeaderDepth, " levels of JSON")};
    return false;
  }
  void leave() {
    --depth_;
    if (depth_ == 2) field_ = Field::other;
  }
  // A value outside the fields read: skipped inside an entry's unknown field or __metadata__,
  // an error where the format puts a tensor entry, a dtype, a shape or offsets.
  bool skipped_value(const char* what) {
    if (depth_ == 1) {  // start_* already entered; the header itself is depth 1
      error = HeaderError{"header", concat("not a JSON object (", what, ")"),
                          "the JSON object of a safetensors file"};
      return false;
    }
    return scalar(what, true);
  }
  bool scalar(const std::string& what, bool entered = false) {
    const int depth = entered ? depth_ - 1 : depth_;
    if (depth == 0) {
      error = HeaderError{"header", concat("not a JSON object (", what, ")"),
                          "the JSON object of a safetensors file"};
      return false;
    }
    if (depth == 1 && !in_metadata_) {
      error = HeaderError{concat("tensor '", shown(name_), "'"), concat("an entry of ", what),
                          "an object with dtype, shape and data_offsets"};
      return false;
    }
    if (in_metadata_ || depth > 3 || field_ == Field::other) return true;  // not read
    if (field_ == Field::dtype) fail_entry("dtype", what, "a string such as \"F32\"");
    if (field_ == Field::shape) fail_entry("shape", what, "an array of sizes ≥ 0");
    if (field_ == Field::offsets) fail_entry("data_offsets", what, "[begin, end], numbers ≥ 0");
    return !error;
  }
  void fail_entry(const char* field, const std::string& given, const std::string& expected) {
    error = HeaderError{concat("tensor '", shown(name_), "'.", field), given, expected};
  }
  void finish_entry() {
    if (!has_dtype_) return fail_entry("dtype", "missing", "a string such as \"F32\"");
    if (!has_shape_) return fail_entry("shape", "missing", "an array of sizes ≥ 0");
    if (offsets_.size() != 2)
      return fail_entry("data_offsets", concat(offsets_.size(), " numbers"), "[begin, end]");
    Tensor t;
    t.dtype = std::move(dtype_);
    t.shape = std::move(shape_);
    t.begin = offsets_[0];
    t.end = offsets_[1];
    tensors.emplace(std::move(name_), std::move(t));
  }

  int depth_ = 0;
  bool in_metadata_ = false;
  Field field_ = Field::other;
  std::string name_, key_, dtype_;
  std::vector<std::uint64_t> shape_, offsets_;
  bool has_dtype_ = false, has_shape_ = false, metadata_object_ = false;
};

// Bytes of `count` elements of `bytes_each`, or nothing when the product overflows.
inline std::optional<std::uint64_t> product(const std::vector<std::uint64_t>& sizes,
                                            std::uint64_t bytes_each) {
  std::uint64_t p = bytes_each;
  for (const std::uint64_t d : sizes)
    if (__builtin_mul_overflow(p, d, &p)) return std::nullopt;
  return p;
}

inline std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    s += concat(i ? ", " : "", shape[i]);
  return shown(s + "]");
}

// A file read and its header checked: tensors by name (offsets inside the data, sizes that
// match their shape and dtype), string metadata. Only a regular file is opened (a directory,
// device or pipe is an Error, not a hang).
// Whether a tensor is a rows × cols matrix, or a [cols] vector when rows is 1.
inline bool has_shape(const Tensor& t, Index rows, Index cols) {
  const auto r = std::uint64_t(rows), c = std::uint64_t(cols);
  const bool same = t.shape.size() == 2 && t.shape[0] == r && t.shape[1] == c;
  const bool vector_like = t.shape.size() == 1 && rows == 1 && t.shape[0] == c;  // [d]
  return same || vector_like;
}

// A seed written as metadata: a decimal uint64.
inline std::uint64_t parse_seed(const char* who, const std::string& key, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long seed = std::strtoull(value.c_str(), &end, 10);
  require(!value.empty() && value[0] >= '0' && value[0] <= '9' &&
              end == value.c_str() + value.size() && errno == 0,
          who, concat("metadata '", shown(key), "'"), concat("\"", shown(value), "\""),
          "a seed: a decimal number below 2^64");
  return static_cast<std::uint64_t>(seed);
}

// Why a tensor cannot be loaded, as an Error would say it.
struct Problem {
  std::string argument, given, expected;
};

struct File {
  std::ifstream in;
  std::uint64_t data_start = 0;
  std::map<std::string, Tensor, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;

  File(const std::filesystem::path& path, const char* who) {
    std::error_code error;
    const auto status = std::filesystem::status(path, error);
    require(!error && std::filesystem::exists(status), who, "path",
            concat(path.string(), " (", error ? error.message() : "no such file", ")"),
            "a file that can be read");
    require(std::filesystem::is_regular_file(status), who, "path",
            concat(path.string(), " (not a regular file)"),
            "a safetensors file (not a directory, device or pipe)");
    const std::uint64_t size = std::filesystem::file_size(path, error);
    require(!error, who, "path", concat(path.string(), " (", error.message(), ")"),
            "a file that can be read");
    in.open(path, std::ios::binary);
    require(bool(in), who, "path", path.string(), "a file that can be read");
    std::uint64_t n = 0;
    require(size >= 8 && bool(in.read(reinterpret_cast<char*>(&n), sizeof n)), who, "path",
            concat(path.string(), " (", size, " bytes)"),
            "a safetensors file (8-byte header length)");
    require(n <= size - 8 && n <= kMaxHeaderBytes, who, "header",
            concat(n, " bytes long in a file of ", size),
            concat("a header of at most ", kMaxHeaderBytes, " bytes inside the file"));
    std::string text(n, '\0');
    require(bool(in.read(text.data(), std::streamsize(n))), who, "header", "unreadable",
            "a file that can be read");
    HeaderReader reader;
    const bool parsed = nlohmann::json::sax_parse(text, &reader);
    if (reader.error)
      throw Error(who, reader.error->argument, reader.error->given, reader.error->expected);
    require(parsed, who, "header", "not valid JSON", "the JSON object of a safetensors file");
    text = {};
    data_start = 8 + n;
    const std::uint64_t data_size = size - data_start;
    for (const auto& [name, t] : reader.tensors) {
      const std::string tensor = concat("tensor '", shown(name), "'");
      require(t.begin <= t.end && t.end <= data_size, who, tensor + ".data_offsets",
              concat("[", t.begin, ", ", t.end, ")"),
              concat("bytes inside the file's ", data_size, " bytes of data (truncated file?)"));
      const std::uint64_t each = dtype_bytes(t.dtype);
      if (each == 0) continue;  // a dtype we never read: refused by name if asked for
      const auto bytes = product(t.shape, each);
      require(
          bytes && *bytes == t.end - t.begin, who, tensor + ".shape",
          concat(shape_text(t.shape), " of ", shown(t.dtype), " in ", t.end - t.begin, " bytes"),
          bytes ? concat(*bytes, " bytes of data for that shape")
                : std::string("a shape whose byte count fits in 64 bits"));
    }
    tensors = std::move(reader.tensors);
    metadata = std::move(reader.metadata);
  }

  // What is wrong with tensor `name` for a rows × cols matrix (or a [cols] vector when rows is
  // 1) of S's dtype, as an Error's argument, given and expected; nothing if it fits.
  template <class S>
  std::optional<Problem> problem(const std::string& name, Index rows, Index cols) const {
    const std::string tensor = concat("tensor '", shown(name), "'");
    const auto it = tensors.find(name);
    if (it == tensors.end())
      return Problem{tensor, "missing from the file", "a tensor for every parameter"};
    const Tensor& t = it->second;
    if (t.dtype != dtype<S>())
      return Problem{tensor, concat("of dtype ", shown(t.dtype)), concat("dtype ", dtype<S>())};
    if (!has_shape(t, rows, cols))
      return Problem{tensor, concat("of shape ", shape_text(t.shape)),
                     concat("[", rows, ", ", cols, "]")};
    return std::nullopt;  // its bytes were checked against its shape when the header was read
  }
  // Why tensor `name` (which exists) is not a rows × cols matrix of S's dtype, or "".
  template <class S>
  std::string mismatch(const std::string& name, Index rows, Index cols) const {
    const Tensor& t = tensors.find(name)->second;
    if (has_shape(t, rows, cols) && t.dtype == dtype<S>()) return {};
    return concat(shape_text(t.shape), " ", shown(t.dtype), " in the file, [", rows, ", ", cols,
                  "] ", dtype<S>(), " in the model");
  }
  template <class S>
  Matrix<S> read(const char* who, const std::string& name, Index rows, Index cols) {
    if (const auto p = problem<S>(name, rows, cols))
      throw Error(who, p->argument, p->given, p->expected);
    const Tensor& t = tensors.find(name)->second;
    Matrix<S> m(rows, cols);
    in.seekg(std::streamoff(data_start + t.begin));
    in.read(reinterpret_cast<char*>(m.data()), std::streamsize(t.end - t.begin));
    require(bool(in), who, concat("tensor '", shown(name), "'"), "unreadable",
            "a file that can be read to its end");
    return m;
  }
  // The rows and columns a tensor's shape gives a matrix ([d] is one row); its byte count,
  // checked against the file when the header was read, bounds both.
  std::pair<Index, Index> matrix_shape(const char* who, const std::string& name) const {
    const Tensor& t = tensors.find(name)->second;
    require(t.shape.size() == 1 || t.shape.size() == 2, who, concat("tensor '", shown(name), "'"),
            concat("of shape ", shape_text(t.shape)), "a vector or a matrix");
    require(dtype_bytes(t.dtype) > 0, who, concat("tensor '", shown(name), "'"),
            concat("of dtype ", shown(t.dtype)), "a dtype of safetensors");
    return t.shape.size() == 1 ? std::pair<Index, Index>{1, Index(t.shape[0])}
                               : std::pair<Index, Index>{Index(t.shape[0]), Index(t.shape[1])};
  }
};

}  // namespace detail

/// Writes every parameter of `models` (anything with visit_parameters: layers, an Embedding)
/// to `path`, through a temporary file renamed over `path` at the end, so a failed save
/// leaves an earlier file as it was. Two parameters with one path are an effattn::Error.
template <class... Models>
void save(const std::filesystem::path& path, Models&... models) {
  using S = std::common_type_t<typename Models::Scalar...>;
  std::vector<std::pair<std::string, const Matrix<S>*>> tensors;
  for (const auto& [name, value] : detail::parameters(models...))
    tensors.emplace_back(name, value);
  // The random state of every Favor and LSH policy: its tensors beside the parameters, its
  // seed as metadata "<path>.seed".
  const auto parts = detail::random_parts(models...);
  std::map<std::string, std::string> metadata;
  for (const auto& part : parts) {
    for (const auto& [name, value] : part.state.tensors)
      tensors.emplace_back(effattn::detail::join_path(part.path, name), &value);
    if (part.state.seed)
      metadata[effattn::detail::join_path(part.path, "seed")] = std::to_string(*part.state.seed);
  }
  detail::write<S>(path, "safetensors::save", tensors, metadata);
}

/// How load matches a file's tensors to the models' parameters.
struct LoadOptions {
  /// Strict (the default): every parameter must be in the file with its shape and dtype, and
  /// every tensor of the file (under the prefix) must be a parameter, or load is an Error and
  /// changes nothing. Not strict: the parameters whose tensor matches are loaded, the others
  /// keep their values, and the report lists what did not match.
  bool strict = true;
  /// The models are a part of the file's model: parameter "<path>" reads tensor
  /// "<prefix><path>", and tensors outside the prefix are left alone (neither loaded nor
  /// unexpected). E.g. "encoder.block.0." loads one block out of a whole model's checkpoint.
  std::string prefix{};
};

/// What a load did: parameter paths (without the prefix) and the file's tensor names. The random
/// state of Favor and LSH policies counts as its tensors ("<path>.features") and its seed
/// ("<path>.seed"), loaded, missing or mismatched together.
struct LoadReport {
  std::vector<std::string> loaded;      ///< parameters read from the file
  std::vector<std::string> missing;     ///< parameters the file has no tensor for (unchanged)
  std::vector<std::string> unexpected;  ///< tensors under the prefix that no parameter names
  /// Parameters whose tensor has another shape or dtype (unchanged), each as
  /// "<path>: [r, c] F32 in the file, [r', c'] F32 in the model".
  std::vector<std::string> mismatched;
  /// Whether every parameter was loaded and the file held nothing else under the prefix.
  bool complete() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  /// The report in a few lines, for a log: counts, then every name that did not match.
  std::string summary() const {
    std::string text =
        detail::concat("loaded ", loaded.size(), " of ",
                       loaded.size() + missing.size() + mismatched.size(), " parameters");
    const auto list = [&](const char* what, const std::vector<std::string>& names) {
      if (names.empty()) return;
      text += detail::concat("\n", what, " (", names.size(), "):");
      for (const auto& name : names)
        text += "\n  " + name;
    };
    list("missing from the file", missing);
    list("in the file but not in the models", unexpected);
    list("of another shape or dtype", mismatched);
    return text;
  }
};

/// Loads the parameters of `models` from `path` as `options` say, and reports what matched.
/// Everything is read and checked before anything is assigned: an unreadable or malformed file
/// (offsets outside it, a truncated body), or in strict mode any tensor that does not match, is
/// an effattn::Error naming it, and the models are left as they were.
template <class... Models>
LoadReport load(const std::filesystem::path& path, const LoadOptions& options, Models&... models) {
  constexpr const char* who = "safetensors::load";
  using S = std::common_type_t<typename Models::Scalar...>;
  using detail::concat;
  detail::File file(path, who);
  const auto params = detail::parameters(models...);
  LoadReport report;
  // Strict: every problem is collected, then one Error names the first and lists the rest.
  std::vector<detail::Problem> problems;
  const auto refuse = [&](std::string argument, std::string given, std::string expected) {
    if (options.strict)
      problems.push_back({std::move(argument), std::move(given), std::move(expected)});
  };
  std::vector<std::size_t> matched;  // indices into params
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& [name, value] = params[i];
    const std::string tensor = options.prefix + name;
    if (const auto p = file.problem<S>(tensor, value->rows(), value->cols())) {
      refuse(p->argument, p->given, p->expected);
      if (!file.tensors.contains(tensor))
        report.missing.push_back(name);
      else
        report.mismatched.push_back(
            concat(name, ": ", file.mismatch<S>(tensor, value->rows(), value->cols())));
      continue;
    }
    matched.push_back(i);
  }
  // The random state of every Favor and LSH policy: the tensors under its path that it claims,
  // and its seed, read and checked before anything is assigned.
  auto parts = detail::random_parts(models...);
  std::vector<std::pair<std::size_t, RandomState<S>>> states;  // (part, state to set)
  // Which policy each tensor under the prefix belongs to, if any (the first that claims it).
  std::vector<std::vector<std::string>> owned(parts.size());
  std::set<std::string, std::less<>> claimed;
  for (const auto& entry : file.tensors) {
    const std::string& name = entry.first;
    if (!name.starts_with(options.prefix)) continue;
    const std::string_view in_models = std::string_view(name).substr(options.prefix.size());
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const std::string under = parts[i].path.empty() ? "" : parts[i].path + ".";
      if (in_models.starts_with(under) &&
          parts[i].claims(std::string(in_models.substr(under.size())))) {
        owned[i].push_back(name);
        claimed.insert(name);
        break;
      }
    }
  }
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const auto& part = parts[i];
    const std::string what = concat("random state '", part.path, "'");
    RandomState<S> state;
    if (part.state.seed) {
      const std::string key = options.prefix + effattn::detail::join_path(part.path, "seed");
      if (const auto it = file.metadata.find(key); it != file.metadata.end())
        state.seed = detail::parse_seed(who, key, it->second);
    }
    std::string bad_dtype;
    for (const std::string& name : owned[i]) {
      const std::string_view in_models = std::string_view(name).substr(options.prefix.size());
      const auto [rows, cols] = file.matrix_shape(who, name);
      if (const std::string why = file.mismatch<S>(name, rows, cols); !why.empty()) {
        refuse(concat("tensor '", detail::shown(name), "'"), why,
               concat("dtype ", detail::dtype<S>()));
        bad_dtype = concat(in_models, ": ", why);
        break;
      }
      state.tensors.emplace_back(
          std::string(in_models.substr(part.path.empty() ? 0 : part.path.size() + 1)),
          file.read<S>(who, name, rows, cols));
    }
    if (!bad_dtype.empty()) {
      report.mismatched.push_back(bad_dtype);
      continue;
    }
    if (!state.seed && state.tensors.empty()) {  // nothing of it in the file
      refuse(what, "missing from the file",
             "the random features or rotations of every Favor and LSH policy (a file of another "
             "policy, or saved before they were kept? LoadOptions{.strict = false} keeps the "
             "model's own draws)");
      for (const std::string& name : detail::state_names(part.path, part.state))
        report.missing.push_back(name);
      continue;
    }
    if (const std::string why = part.check(state); !why.empty()) {
      refuse(what, why, "the random state its policy has");
      report.mismatched.push_back(concat(part.path.empty() ? "(the model)" : part.path, ": ", why));
      continue;
    }
    states.emplace_back(i, std::move(state));
  }
  for (const auto& entry : file.tensors) {
    const std::string& name = entry.first;
    if (!name.starts_with(options.prefix)) continue;
    const std::string_view path_in_models = std::string_view(name).substr(options.prefix.size());
    if (std::any_of(params.begin(), params.end(),
                    [&](const auto& p) { return p.first == path_in_models; }))
      continue;
    if (claimed.contains(name)) continue;  // a policy's random state
    refuse(concat("tensor '", detail::shown(name), "'"), "in the file",
           "only tensors the models have (a file of another model? LoadOptions{.strict = false} "
           "loads what matches, .prefix a part)");
    report.unexpected.push_back(name);
  }
  if (!problems.empty()) {  // strict: one Error, the first problem and a list of the others
    const detail::Problem& first = problems.front();
    std::string given = first.given;
    if (problems.size() > 1) {
      given += concat("; and ", problems.size() - 1, " more:");
      for (std::size_t i = 1; i < problems.size() && i <= 20; ++i)
        given += concat(" ", problems[i].argument, " ", problems[i].given, ";");
      if (problems.size() > 21) given += " …";
    }
    throw Error(who, first.argument, given, first.expected);
  }
  std::vector<Matrix<S>> values;  // everything checked: read all, then assign all
  values.reserve(matched.size());
  for (const std::size_t i : matched)
    values.push_back(file.read<S>(who, options.prefix + params[i].first, params[i].second->rows(),
                                  params[i].second->cols()));
  for (std::size_t j = 0; j < matched.size(); ++j) {
    *params[matched[j]].second = std::move(values[j]);
    report.loaded.push_back(params[matched[j]].first);
  }
  for (const auto& [i, state] : states) {
    parts[i].set(state);
    for (const std::string& name : detail::state_names(parts[i].path, state))
      report.loaded.push_back(name);
  }
  return report;
}

/// Loads every parameter of `models` from `path`, strictly: a missing tensor, one of another
/// shape or dtype, a tensor in the file that no parameter names, offsets outside the file or a
/// truncated body is an effattn::Error naming the tensor, and the models are left as they were.
template <class... Models>
LoadReport load(const std::filesystem::path& path, Models&... models) {
  return load(path, LoadOptions{}, models...);
}

/// Writes an optimiser's state (Sgd, Adam, AdamW) to `path`: tensors "<parameter path>.<slot>"
/// (Sgd: momentum; Adam: exp_avg, exp_avg_sq) and each parameter's step count as metadata
/// "steps.<parameter path>", so training resumes where it stopped.
template <class Optimizer>
void save_optimizer(const std::filesystem::path& path, const Optimizer& optimizer) {
  using S = typename Optimizer::Scalar;
  const auto slots = optimizer.slot_names();
  std::vector<std::pair<std::string, const Matrix<S>*>> tensors;
  std::map<std::string, std::string> metadata;
  for (const auto& [name, entry] : optimizer.state()) {
    metadata["steps." + name] = std::to_string(entry.steps);
    for (std::size_t i = 0; i < slots.size(); ++i)
      tensors.emplace_back(name + "." + std::string(slots[i]), &entry.slots[i]);
  }
  detail::write<S>(path, "safetensors::save_optimizer", tensors, metadata);
}

/// Replaces an optimiser's state by the one save_optimizer wrote to `path`. Every tensor and
/// step count is checked first (a missing slot, a tensor of no parameter, mismatched shapes or
/// dtype, a step count that is not a number): an effattn::Error, and the state is unchanged.
template <class Optimizer>
void load_optimizer(const std::filesystem::path& path, Optimizer& optimizer) {
  constexpr const char* who = "safetensors::load_optimizer";
  using S = typename Optimizer::Scalar;
  using detail::concat;
  using detail::require;
  detail::File file(path, who);
  const auto slots = optimizer.slot_names();
  typename Optimizer::Entries entries;
  std::size_t expected_tensors = 0;
  for (const auto& [key, value] : file.metadata) {
    if (!key.starts_with("steps.")) continue;
    const std::string name = key.substr(6);
    auto& entry = entries[name];
    char* end = nullptr;
    errno = 0;
    const long long steps = std::strtoll(value.c_str(), &end, 10);
    require(!value.empty() && end == value.c_str() + value.size() && errno == 0 && steps >= 0 &&
                steps <= effattn::detail::kMaxOptimizerSteps,
            who, concat("metadata '", detail::shown(key), "'"),
            concat("\"", detail::shown(value), "\""),
            concat("a step count from 0 to ", effattn::detail::kMaxOptimizerSteps));
    entry.steps = steps;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const std::string tensor = name + "." + std::string(slots[i]);
      require(file.tensors.contains(tensor), who, concat("tensor '", tensor, "'"),
              "missing from the file", concat("the ", slots[i], " of every parameter"));
      const auto [rows, cols] = file.matrix_shape(who, tensor);
      entry.slots.push_back(file.read<S>(who, tensor, rows, cols));
      ++expected_tensors;
    }
  }
  require(file.tensors.size() == expected_tensors, who, "path",
          concat(path.string(), " (", file.tensors.size(), " tensors for ", entries.size(),
                 " parameters)"),
          concat(slots.size(), " tensors per parameter, as save_optimizer writes"));
  optimizer.set_state(std::move(entries));
}

}  // namespace safetensors
}  // namespace effattn
