#pragma once
// Checkpoints in the safetensors format: save and load every parameter of a model by path.
//
// Needs nlohmann/json (Debian: nlohmann-json3-dev) for the header; the rest of effattn does not.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
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

/// Writes every parameter of `models` (anything with visit_parameters: layers, an Embedding)
/// to `path`, through a temporary file renamed over `path` at the end, so a failed save
/// leaves an earlier file as it was. Two parameters with one path are an effattn::Error.
template <class... Models>
void save(const std::filesystem::path& path, Models&... models) {
  constexpr const char* who = "safetensors::save";
  const auto params = detail::parameters(models...);
  using S = std::common_type_t<typename Models::Scalar...>;
  nlohmann::ordered_json header;
  std::uint64_t offset = 0;
  for (const auto& [name, value] : params) {
    effattn::detail::require(!header.contains(name), who, "models",
                             effattn::detail::concat("two parameters named '", name, "'"),
                             "one path per parameter");
    const std::uint64_t bytes = sizeof(S) * std::uint64_t(value->size());
    header[name] = {{"dtype", detail::dtype<S>()},
                    {"shape", {value->rows(), value->cols()}},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  header["__metadata__"] = {{"format", "effattn"}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::filesystem::path temporary = path;
  temporary += ".partial";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    effattn::detail::require(bool(out), who, "path", path.string(), "a file that can be written");
    const std::uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), sizeof n);
    out.write(text.data(), std::streamsize(text.size()));
    for (const auto& [name, value] : params)
      out.write(reinterpret_cast<const char*>(value->data()),
                std::streamsize(sizeof(S) * std::size_t(value->size())));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      effattn::detail::require(false, who, "path", path.string(),
                               "a file that can be written to the end (disk full?)");
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  effattn::detail::require(
      !error, who, "path", path.string(),
      effattn::detail::concat("a path the file can be moved to (", error.message(), ")"));
}

/// Loads every parameter of `models` from `path`. Everything is read and checked first:
/// a missing tensor, one of another shape or dtype, a tensor in the file that no parameter
/// names, offsets outside the file or a truncated body is an effattn::Error naming the
/// tensor, and the models are left as they were.
template <class... Models>
void load(const std::filesystem::path& path, Models&... models) {
  constexpr const char* who = "safetensors::load";
  using effattn::detail::concat;
  using effattn::detail::require;
  using S = std::common_type_t<typename Models::Scalar...>;
  std::ifstream in(path, std::ios::binary);
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
  const std::uint64_t data_size = size - 8 - n;

  std::map<std::string, detail::Tensor, std::less<>> tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    detail::Tensor t;
    const bool well_formed =
        entry.is_object() && entry.contains("dtype") && entry["dtype"].is_string() &&
        entry.contains("shape") && entry["shape"].is_array() && entry.contains("data_offsets") &&
        entry["data_offsets"].is_array() && entry["data_offsets"].size() == 2 &&
        entry["data_offsets"][0].is_number_unsigned() &&
        entry["data_offsets"][1].is_number_unsigned();
    require(well_formed, who, concat("tensor '", name, "'"), entry.dump(),
            "an entry with dtype, shape and two data_offsets");
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
    tensors.emplace(name, std::move(t));
  }

  const auto params = detail::parameters(models...);
  for (const auto& [name, value] : params) {
    const auto it = tensors.find(name);
    require(it != tensors.end(), who, concat("tensor '", name, "'"), "missing from the file",
            concat("a tensor for every parameter (", path.string(), ")"));
    const detail::Tensor& t = it->second;
    require(t.dtype == detail::dtype<S>(), who, concat("tensor '", name, "'"),
            concat("of dtype ", t.dtype), concat("dtype ", detail::dtype<S>()));
    const bool same =
        t.shape.size() == 2 && t.shape[0] == value->rows() && t.shape[1] == value->cols();
    const bool vector_like = t.shape.size() == 1 && value->rows() == 1 &&
                             t.shape[0] == value->cols();  // a bias saved as [d]
    require(same || vector_like, who, concat("tensor '", name, "'"),
            concat("of shape ", nlohmann::json(t.shape).dump()),
            concat("[", value->rows(), ", ", value->cols(), "], the parameter's"));
    require(t.end - t.begin == sizeof(S) * std::uint64_t(value->size()), who,
            concat("tensor '", name, "'"), concat(t.end - t.begin, " bytes"),
            concat(sizeof(S) * std::uint64_t(value->size()), " bytes for its shape"));
  }
  for (const auto& [name, t] : tensors)
    require(
        std::any_of(params.begin(), params.end(), [&](const auto& p) { return p.first == name; }),
        who, concat("tensor '", name, "'"), "in the file",
        "only tensors the models have (a file of another model?)");

  // Everything checked: read each tensor into a copy, then assign all at once.
  std::vector<Matrix<S>> values;
  values.reserve(params.size());
  for (const auto& [name, value] : params) {
    const detail::Tensor& t = tensors.find(name)->second;
    Matrix<S> m(value->rows(), value->cols());
    in.seekg(std::streamoff(8 + n + t.begin));
    in.read(reinterpret_cast<char*>(m.data()), std::streamsize(t.end - t.begin));
    require(bool(in), who, concat("tensor '", name, "'"), "unreadable",
            "a file that can be read to its end");
    values.push_back(std::move(m));
  }
  for (std::size_t i = 0; i < params.size(); ++i)
    *params[i].second = std::move(values[i]);
}

}  // namespace safetensors
}  // namespace effattn
