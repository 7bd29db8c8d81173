#pragma once
// Checkpoints in the safetensors format: save and load every parameter of a model by path.
//
// Needs nlohmann/json (Debian: nlohmann-json3-dev) for the header; the rest of effattn does not.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "effattn/core/error.hpp"
#include "effattn/core/types.hpp"

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
  std::vector<std::int64_t> shape;
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

}  // namespace detail

namespace detail {

using effattn::detail::concat;
using effattn::detail::require;

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

// A file read and its header checked: tensors by name (offsets inside the data), metadata.
struct File {
  std::ifstream in;
  std::uint64_t data_start = 0;
  std::map<std::string, Tensor, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;

  File(const std::filesystem::path& path, const char* who) : in(path, std::ios::binary) {
    require(bool(in), who, "path", path.string(), "a file that can be read");
    const std::uint64_t size = std::filesystem::file_size(path);
    std::uint64_t n = 0;
    require(size >= 8 && bool(in.read(reinterpret_cast<char*>(&n), sizeof n)), who, "path",
            concat(path.string(), " (", size, " bytes)"),
            "a safetensors file (8-byte header length)");
    require(n <= size - 8 && n <= (std::uint64_t(100) << 20), who, "header",
            concat(n, " bytes long in a file of ", size),
            "a header of at most 100 MB inside the file");
    std::string text(n, '\0');
    in.read(text.data(), std::streamsize(n));
    const nlohmann::json header = nlohmann::json::parse(text, nullptr, false);
    require(!header.is_discarded() && header.is_object(), who, "header", "not a JSON object",
            "the JSON object of a safetensors file");
    data_start = 8 + n;
    const std::uint64_t data_size = size - data_start;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (entry.is_object())
          for (const auto& [key, value] : entry.items())
            if (value.is_string()) metadata[key] = value.template get<std::string>();
        continue;
      }
      tensors.emplace(name, tensor(who, name, entry, data_size));
    }
  }

  // The tensor `name` read into m (rows × cols, dtype of S), checked first.
  template <class S>
  void check(const char* who, const std::string& name, Index rows, Index cols) const {
    const auto it = tensors.find(name);
    require(it != tensors.end(), who, concat("tensor '", name, "'"), "missing from the file",
            "a tensor for every parameter");
    const Tensor& t = it->second;
    require(t.dtype == dtype<S>(), who, concat("tensor '", name, "'"), concat("of dtype ", t.dtype),
            concat("dtype ", dtype<S>()));
    const bool same = t.shape.size() == 2 && t.shape[0] == rows && t.shape[1] == cols;
    const bool vector_like = t.shape.size() == 1 && rows == 1 && t.shape[0] == cols;  // [d]
    require(same || vector_like, who, concat("tensor '", name, "'"),
            concat("of shape ", nlohmann::json(t.shape).dump()),
            concat("[", rows, ", ", cols, "]"));
    require(t.end - t.begin == sizeof(S) * std::uint64_t(rows * cols), who,
            concat("tensor '", name, "'"), concat(t.end - t.begin, " bytes"),
            concat(sizeof(S) * std::uint64_t(rows * cols), " bytes for its shape"));
  }
  template <class S>
  Matrix<S> read(const char* who, const std::string& name, Index rows, Index cols) {
    check<S>(who, name, rows, cols);
    const Tensor& t = tensors.find(name)->second;
    Matrix<S> m(rows, cols);
    in.seekg(std::streamoff(data_start + t.begin));
    in.read(reinterpret_cast<char*>(m.data()), std::streamsize(t.end - t.begin));
    require(bool(in), who, concat("tensor '", name, "'"), "unreadable",
            "a file that can be read to its end");
    return m;
  }
  // The rows and columns a tensor's shape gives a matrix ([d] is one row).
  std::pair<Index, Index> matrix_shape(const char* who, const std::string& name) const {
    const Tensor& t = tensors.find(name)->second;
    require(t.shape.size() == 1 || t.shape.size() == 2, who, concat("tensor '", name, "'"),
            concat("of shape ", nlohmann::json(t.shape).dump()), "a vector or a matrix");
    return t.shape.size() == 1 ? std::pair<Index, Index>{1, t.shape[0]}
                               : std::pair<Index, Index>{t.shape[0], t.shape[1]};
  }

 private:
  static Tensor tensor(const char* who, const std::string& name, const nlohmann::json& entry,
                       std::uint64_t data_size) {
    const bool well_formed =
        entry.is_object() && entry.contains("dtype") && entry["dtype"].is_string() &&
        entry.contains("shape") && entry["shape"].is_array() && entry.contains("data_offsets") &&
        entry["data_offsets"].is_array() && entry["data_offsets"].size() == 2 &&
        entry["data_offsets"][0].is_number_unsigned() &&
        entry["data_offsets"][1].is_number_unsigned();
    require(well_formed, who, concat("tensor '", name, "'"), entry.dump(),
            "an entry with dtype, shape and two data_offsets");
    Tensor t;
    t.dtype = entry["dtype"].template get<std::string>();
    for (const auto& d : entry["shape"]) {
      require(d.is_number_integer() && d.template get<std::int64_t>() >= 0, who,
              concat("tensor '", name, "'"), concat("of shape ", entry["shape"].dump()),
              "a shape of sizes ≥ 0");
      t.shape.push_back(d.template get<std::int64_t>());
    }
    t.begin = entry["data_offsets"][0].template get<std::uint64_t>();
    t.end = entry["data_offsets"][1].template get<std::uint64_t>();
    require(t.begin <= t.end && t.end <= data_size, who, concat("tensor '", name, "'"),
            concat("stored at bytes [", t.begin, ", ", t.end, ") of the data"),
            concat("bytes inside the file's ", data_size, " bytes of data (truncated file?)"));
    return t;
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
  detail::write<S>(path, "safetensors::save", tensors, {});
}

/// Loads every parameter of `models` from `path`. Everything is read and checked first:
/// a missing tensor, one of another shape or dtype, a tensor in the file that no parameter
/// names, offsets outside the file or a truncated body is an effattn::Error naming the
/// tensor, and the models are left as they were.
template <class... Models>
void load(const std::filesystem::path& path, Models&... models) {
  constexpr const char* who = "safetensors::load";
  using S = std::common_type_t<typename Models::Scalar...>;
  detail::File file(path, who);
  const auto params = detail::parameters(models...);
  for (const auto& [name, value] : params)
    file.check<S>(who, name, value->rows(), value->cols());
  for (const auto& [name, t] : file.tensors)
    detail::require(
        std::any_of(params.begin(), params.end(), [&](const auto& p) { return p.first == name; }),
        who, detail::concat("tensor '", name, "'"), "in the file",
        "only tensors the models have (a file of another model?)");
  std::vector<Matrix<S>> values;  // everything checked: read all, then assign all
  values.reserve(params.size());
  for (const auto& [name, value] : params)
    values.push_back(file.read<S>(who, name, value->rows(), value->cols()));
  for (std::size_t i = 0; i < params.size(); ++i)
    *params[i].second = std::move(values[i]);
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
    entry.steps = std::strtoll(value.c_str(), &end, 10);
    require(!value.empty() && end == value.c_str() + value.size(), who,
            concat("metadata '", key, "'"), concat("\"", value, "\""), "a step count");
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
