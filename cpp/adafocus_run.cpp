// adafocus-run: the early-exit loop in C++, on the AOTInductor packages of an export (AdaFocusV3 and
// Uni-AdaFocus: the protocol's one loop, whose crop graph takes a patch box too for the latter).
//
//   adafocus-run EXPORT_DIR VIDEOS.npy [--device cpu|cuda] [--precision fp32|fp16] [--thresholds H0,...,HK]
//
// Follows docs/runtime-protocol.md: verifies the export (format, versions, the manifest's own sha256
// over its canonical JSON, every file's sha256, no stray files), then runs the batched loop with
// compaction on the packages listed under engines.aoti.<device>.<precision>, and prints one JSON line
// per video in input order: index, class_index, exit_step, cube_starts and centres (of the cubes used;
// Uni-AdaFocus centres are patch boxes), probabilities (softmax of the float32 exit logits, in
// float64), gflops.
//
// VIDEOS.npy: one float32 array (B, T, 3, H, W), C order, written by numpy.save in one call, the
// videos preprocessed as the manifest's `input` says. Build: cpp/build.sh (README, "C++ runner").

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// One clear error: what is wrong and how to fix it; main prints it and exits 1.
struct Refusal : std::runtime_error {
  Refusal(const std::string& what, const std::string& fix) : std::runtime_error(what + "\n  fix: " + fix) {}
};

const char* const kReexport = "re-run adafocus-export into a fresh directory (or restore the directory from its source)";
const std::vector<std::string> kLoopGraphs = {"glance", "policy", "crop", "local", "classifier"};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Refusal("cannot read " + path.string(), "check the path and its permissions");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string sha256_hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1 || EVP_DigestUpdate(ctx, data.data(), data.size()) != 1 ||
      EVP_DigestFinal_ex(ctx, digest, &length) != 1) {
    EVP_MD_CTX_free(ctx);
    throw std::runtime_error("OpenSSL could not compute a sha256");
  }
  EVP_MD_CTX_free(ctx);
  std::ostringstream hex;
  for (unsigned int i = 0; i < length; ++i) hex << std::hex << std::setw(2) << std::setfill('0') << int(digest[i]);
  return hex.str();
}

// A float as Python's repr writes it (what json.dumps emits): the shortest digits that round-trip,
// fixed notation for decimal exponents -5 < e < 16 (with ".0" when integral), else d.ddde+XX.
std::string python_float(double x) {
  char buffer[64];
  auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, x, std::chars_format::scientific);
  if (error != std::errc()) throw std::runtime_error("cannot format a float");
  const std::string text(buffer, end);  // e.g. -2.3019790649414062e+00
  const size_t e = text.find('e');
  const bool negative = text[0] == '-';
  std::string digits;
  for (size_t i = negative; i < e; ++i) if (text[i] != '.') digits += text[i];
  const int exponent = std::stoi(text.substr(e + 1));
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    const std::string power = std::to_string(std::abs(exponent));
    out += std::string("e") + (exponent < 0 ? "-" : "+") + (power.size() < 2 ? "0" : "") + power;
  } else if (exponent < 0) {
    out += "0." + std::string(-exponent - 1, '0') + digits;
  } else if (size_t(exponent) + 1 >= digits.size()) {
    out += digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  } else {
    out += digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
  }
  return out;
}

// The manifest's canonical form (docs/runtime-protocol.md): Python's json.dumps(sort_keys=True,
// separators=(",", ":"), ensure_ascii=False). Keys and strings as nlohmann writes them (the same
// escapes), numbers as Python does.
void canonical(const json& value, std::string& out) {
  if (value.is_object()) {  // nlohmann keeps object keys sorted, byte-wise = code point order in UTF-8
    out += '{';
    bool first = true;
    for (const auto& [key, item] : value.items()) {
      if (!first) out += ',';
      first = false;
      out += json(key).dump() + ':';
      canonical(item, out);
    }
    out += '}';
  } else if (value.is_array()) {
    out += '[';
    for (size_t i = 0; i < value.size(); ++i) {
      if (i) out += ',';
      canonical(value[i], out);
    }
    out += ']';
  } else if (value.is_number_float()) {
    out += python_float(value.get<double>());
  } else {
    out += value.dump();
  }
}

// Section 1 of the protocol: refuse what this reader does not know, then verify the seal.
json open_export(const fs::path& dir) {
  const fs::path path = dir / "manifest.json";
  if (!fs::is_regular_file(path)) throw Refusal(dir.string() + " has no manifest.json: it is not an adafocus export", "run adafocus-export");
  json manifest;
  try {
    manifest = json::parse(read_file(path));
  } catch (const json::parse_error& e) {
    throw Refusal(path.string() + " is not valid JSON (" + e.what() + ")", kReexport);
  }
  if (manifest.value("format", "") != "adafocus-export") throw Refusal(path.string() + " is not an adafocus export manifest", "run adafocus-export");
  if (manifest.value("schema_version", 0) != 1 || !manifest.contains("protocol") || manifest["protocol"].value("version", 0) != 1)
    throw Refusal(path.string() + " has a schema or protocol version this runner does not know (it reads schema 1, protocol 1)",
                  "use the adafocus-run of the adafocus-deploy version that wrote it, or re-export");
  json body = manifest;
  body.erase("manifest_sha256");
  std::string text;
  canonical(body, text);
  if (sha256_hex(text) != manifest.value("manifest_sha256", ""))
    throw Refusal(path.string() + " was changed after it was written (its content hash does not match)", kReexport);
  std::set<std::string> listed;
  for (const auto& [name, record] : manifest["files"].items()) {
    listed.insert(name);
    const fs::path file = dir / name;
    if (!fs::is_regular_file(file)) throw Refusal(dir.string() + " lacks " + name + ", listed in its manifest", kReexport);
    const std::string data = read_file(file);
    if (data.size() != record["bytes"].get<size_t>() || sha256_hex(data) != record["sha256"].get<std::string>())
      throw Refusal(file.string() + " does not match its manifest entry (sha256 differs): stale, mixed or tampered", kReexport);
  }
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || name == "manifest.json" || name.rfind('.', 0) == 0) continue;
    if (!listed.count(name)) throw Refusal(dir.string() + " holds " + name + ", not part of this export (a mixed directory?)", "remove the stray file, or " + std::string(kReexport));
  }
  return manifest;
}

// numpy's .npy format, version 1 or 2: magic, header length, a Python dict literal, raw data.
at::Tensor read_npy(const fs::path& path) {
  const std::string data = read_file(path);
  const std::string bad = path.string() + " is not a float32 .npy array";
  const std::string fix = "write it with numpy.save(path, videos.astype(numpy.float32)) (C order)";
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) throw Refusal(bad, fix);
  const int major = static_cast<unsigned char>(data[6]);
  size_t header_length = 0, offset = 0;
  if (major == 1) {
    header_length = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
    offset = 10;
  } else {
    for (int i = 0; i < 4; ++i) header_length |= size_t(static_cast<unsigned char>(data[8 + i])) << (8 * i);
    offset = 12;
  }
  const std::string header = data.substr(offset, header_length);
  if (header.find("'descr': '<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    throw Refusal(bad + " in C order (header " + header + ")", fix);
  const size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  std::vector<int64_t> shape;
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  for (std::string dim; std::getline(dims, dim, ',');)
    if (dim.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(dim));
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  if (data.size() - offset - header_length != size_t(count) * 4) throw Refusal(bad + ": it is shorter or longer than its shape", fix);
  return at::from_blob(const_cast<char*>(data.data() + offset + header_length), shape, at::kFloat).clone();
}

struct Graph {
  std::vector<std::string> inputs;  // the manifest's order
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<std::string> outputs;

  std::map<std::string, at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    std::vector<at::Tensor> contiguous;
    for (const auto& t : inputs) contiguous.push_back(t.contiguous());
    const std::vector<at::Tensor> out = loader->run(contiguous);
    std::map<std::string, at::Tensor> named;
    for (size_t i = 0; i < outputs.size(); ++i) named[outputs[i]] = out.at(i);
    return named;
  }
};

std::map<std::string, Graph> load_packages(const fs::path& dir, const json& manifest, const std::string& device,
                                           const std::string& precision, int64_t* max_batch) {
  const std::string rebuild = "adafocus-export --aoti --device " + device + " --precision " + precision + " --into " + dir.string();
  const json& engines = manifest["engines"];
  if (!engines.contains("aoti") || !engines["aoti"].contains(device) || !engines["aoti"][device].contains(precision))
    throw Refusal(dir.string() + " has no AOTInductor " + device + " " + precision + " packages", "run " + rebuild);
  const json& records = engines["aoti"][device][precision];
  const std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                           std::to_string(TORCH_VERSION_PATCH);
  std::map<std::string, Graph> graphs;
  *max_batch = std::numeric_limits<int64_t>::max();
  for (const std::string& name : kLoopGraphs) {
    const json& record = records.at(name);
    // revision 2 (adafocus/export/aoti.py PACKAGE_REVISION): the compiled batch bounds cover the recorded range
    if (const int64_t revision = record.value("package_revision", int64_t{1}); revision < 2)
      throw Refusal("the " + name + " package is of revision " + std::to_string(revision) +
                        ", compiled by an older adafocus-deploy for a narrower batch range than it records; this runner needs revision 2",
                    "recompile the packages: " + rebuild);
    // the loop calls every graph with as few as one video (adafocus/export/graphs.py check_batch_range)
    if (const int64_t lowest = record["batch_range"][0].get<int64_t>(); lowest != 1)
      throw Refusal("the " + name + " package refuses batches below " + std::to_string(lowest) +
                        "; the early-exit loop calls every graph with as few as one video",
                    "recompile the packages with a batch range from 1 (the default): " + rebuild);
    const std::string built = record["torch"].get<std::string>();
    if (built.substr(0, built.find('+')) != here)
      throw Refusal("the " + name + " package was compiled with torch " + built + "; this runner is built on libtorch " + here,
                    "recompile the packages with this torch (" + rebuild + "), or build the runner against that torch");
    Graph graph;
    graph.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>((dir / record["file"].get<std::string>()).string());
    for (const auto& output : manifest["graphs"][name]["outputs"]) graph.outputs.push_back(output["name"].get<std::string>());
    for (const auto& input : manifest["graphs"][name]["inputs"]) graph.inputs.push_back(input["name"].get<std::string>());
    *max_batch = std::min<int64_t>(*max_batch, record["batch_range"][2].get<int64_t>());
    graphs.emplace(name, std::move(graph));
  }
  return graphs;
}

struct Result {
  int64_t exit_step = 0;
  at::Tensor logits;  // (N,) float32, host
  std::vector<std::array<int64_t, 3>> starts;  // the cubes used
  std::vector<std::vector<float>> centres;  // theirs: (x, y, t) in [0, 1], or a Uni-AdaFocus box (x0, y0, w, h)
};

// Section 3 of the protocol, per batch with compaction.
void run_batch(std::map<std::string, Graph>& g, const at::Tensor& videos, const std::vector<float>& eta, int64_t k_max,
               int64_t first_index, std::vector<Result>& results) {
  const auto device = videos.device();
  auto glance = g["glance"].run({videos});
  auto entropy0 = glance["entropy"].to(at::kCPU);
  std::vector<int64_t> running;
  for (int64_t i = 0; i < videos.size(0); ++i) {
    if (entropy0[i].item<float>() <= eta[0]) {
      results[first_index + i].exit_step = 0;
      results[first_index + i].logits = glance["logits"][i].to(at::kCPU);
    } else {
      running.push_back(i);
    }
  }
  if (running.empty()) return;
  auto rows = at::tensor(running, at::kLong).to(device);
  auto plan = g["policy"].run({glance["maps"].index_select(0, rows)});
  auto starts = plan["cube_starts"];  // (n, K, 3) on the device
  auto centres = plan["centres"];  // (n, K, 3), or (n, K, 4) boxes: Uni-AdaFocus's crop resamples them
  auto global_state = glance["global_state"].index_select(0, rows);
  auto local_state = at::zeros_like(global_state);
  for (int64_t k = 1; k <= k_max && !running.empty(); ++k) {
    const std::map<std::string, at::Tensor> crop_feeds = {
        {"pool", videos}, {"rows", rows}, {"starts", starts.select(1, k - 1)}, {"boxes", centres.select(1, k - 1)}};
    std::vector<at::Tensor> crop_inputs;
    for (const auto& name : g["crop"].inputs) crop_inputs.push_back(crop_feeds.at(name));  // checked at load
    auto cubes = g["crop"].run(crop_inputs)["cubes"];
    auto features = g["local"].run({cubes})["features"];
    auto step = at::full({int64_t(running.size())}, k, at::TensorOptions().dtype(at::kLong).device(device));
    auto out = g["classifier"].run({features, local_state, global_state, step});
    auto entropy = out["entropy"].to(at::kCPU);
    auto logits = out["logits"].to(at::kCPU);
    auto host_starts = starts.to(at::kCPU);
    auto host_centres = centres.to(at::kCPU).contiguous();
    std::vector<int64_t> keep, next_running;
    for (size_t r = 0; r < running.size(); ++r) {
      if (k == k_max || entropy[r].item<float>() <= eta[k]) {
        Result& result = results[first_index + running[r]];
        result.exit_step = k;
        result.logits = logits[r];
        for (int64_t c = 0; c < k; ++c) {
          result.starts.push_back({host_starts[r][c][0].item<int64_t>(), host_starts[r][c][1].item<int64_t>(),
                                   host_starts[r][c][2].item<int64_t>()});
          const float* centre = host_centres[r][c].data_ptr<float>();
          result.centres.emplace_back(centre, centre + host_centres.size(2));
        }
      } else {
        keep.push_back(int64_t(r));
        next_running.push_back(running[r]);
      }
    }
    if (next_running.empty()) break;
    auto kept = at::tensor(keep, at::kLong).to(device);
    starts = starts.index_select(0, kept);
    centres = centres.index_select(0, kept);
    local_state = out["next_local_state"].index_select(0, kept);
    global_state = global_state.index_select(0, kept);
    running = next_running;
    rows = at::tensor(running, at::kLong).to(device);
  }
}

// As Python's --thresholds reads them (adafocus.cli.common.parse_thresholds): entropies, inf, -inf,
// none/null (never exit), spaces and case ignored; a number is read as a double and then rounded to
// float32, as Python's float() then numpy's float32 do (strtof's single rounding can differ). NaN
// and text are refused: a NaN threshold compares false with every entropy and silently never exits.
std::vector<float> parse_thresholds(const std::string& text) {
  const std::string fix = "give comma-separated entropies, e.g. 0.5,0.4,0.3 (inf always exits there; -inf or none never)";
  std::vector<float> values;
  std::stringstream parts(text);
  for (std::string part; std::getline(parts, part, ',');) {
    const size_t first = part.find_first_not_of(" \t"), last = part.find_last_not_of(" \t");
    std::string word = first == std::string::npos ? "" : part.substr(first, last - first + 1);
    for (char& c : word) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (word == "none" || word == "null") {
      values.push_back(-std::numeric_limits<float>::infinity());
      continue;
    }
    char* end = nullptr;
    const double value = std::strtod(word.c_str(), &end);  // reads inf, -inf, infinity; ERANGE gives ±HUGE_VAL or 0
    if (word.empty() || end != word.c_str() + word.size() || std::isnan(value))
      throw Refusal("--thresholds: '" + word + "' is not a threshold", fix);
    values.push_back(static_cast<float>(value));
  }
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    std::string device = "cpu", precision, thresholds_text;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--device" && i + 1 < args.size()) device = args[++i];
      else if (args[i] == "--precision" && i + 1 < args.size()) precision = args[++i];
      else if (args[i] == "--thresholds" && i + 1 < args.size()) thresholds_text = args[++i];
      else if (args[i] == "--print-canonical" && i + 1 < args.size()) {  // for tests: the hashing form of a JSON file
        std::string text;
        canonical(json::parse(read_file(args[++i])), text);
        std::cout << text;
        return 0;
      } else if (args[i] == "-h" || args[i] == "--help") {
        std::cout << "usage: adafocus-run EXPORT_DIR VIDEOS.npy [--device cpu|cuda] [--precision fp32|fp16] "
                     "[--thresholds H0,...,HK]\n";
        return 0;
      } else positional.push_back(args[i]);
    }
    if (positional.size() != 2) throw Refusal("expected EXPORT_DIR and VIDEOS.npy", "see adafocus-run --help");
    if (device != "cpu" && device != "cuda") throw Refusal("unknown device " + device, "use --device cpu or cuda");
    if (precision.empty()) precision = device == "cuda" ? "fp16" : "fp32";
    if (device == "cuda" && precision == "fp32") {
      // fp32 means fp32, as in Python's runtime: cuDNN and cuBLAS would run fp32 convolutions and
      // matmuls in TF32 on Ampere and newer GPUs (logits move by ~1e-3)
      at::globalContext().setAllowTF32CuDNN(false);
      at::globalContext().setAllowTF32CuBLAS(false);
    }
    const fs::path dir = positional[0];
    const json manifest = open_export(dir);
    // the crop graph's inputs this loop feeds (a Uni-AdaFocus crop also takes the step's patch box)
    for (const auto& input : manifest["graphs"]["crop"]["inputs"])
      if (const std::string name = input["name"].get<std::string>();
          name != "pool" && name != "rows" && name != "starts" && name != "boxes")
        throw Refusal(dir.string() + ": its crop graph takes an input '" + name + "' this runner does not know",
                      "run it with the Python runtime (adafocus-predict), or update adafocus-run");
    const int64_t k_max = manifest["protocol"]["max_cubes"].get<int64_t>();

    std::vector<float> eta(k_max + 1, -std::numeric_limits<float>::infinity());  // null: never exit early
    if (!thresholds_text.empty()) eta = parse_thresholds(thresholds_text);
    else if (!manifest["thresholds"].is_null())
      for (int64_t t = 0; t <= k_max; ++t) eta[t] = manifest["thresholds"][t].get<float>();  // compared in float32
    if (int64_t(eta.size()) != k_max + 1)
      throw Refusal("needs " + std::to_string(k_max + 1) + " thresholds (steps 0.." + std::to_string(k_max) + ")", "give one per step");

    at::Tensor videos = read_npy(positional[1]);
    std::vector<int64_t> want = {videos.dim() == 5 ? videos.size(0) : -1};
    for (const auto& d : manifest["input"]["shape"]) if (d.is_number()) want.push_back(d.get<int64_t>());
    if (videos.dim() != 5 || videos.sizes().vec() != want)
      throw Refusal(positional[1] + " has shape " + c10::str(videos.sizes()) + ", the export takes (B, " +
                        c10::str(at::IntArrayRef(want).slice(1)) + ")",
                    "preprocess the videos as the manifest's input says");
    if (!at::isfinite(videos).all().item<bool>()) throw Refusal(positional[1] + " holds NaN or inf values", "check the decoder and normalisation");

    int64_t max_batch = 0;
    auto graphs = load_packages(dir, manifest, device, precision, &max_batch);
    const at::Device target = device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    std::vector<Result> results(videos.size(0));
    for (int64_t first = 0; first < videos.size(0); first += max_batch) {
      const int64_t count = std::min(max_batch, videos.size(0) - first);
      run_batch(graphs, videos.narrow(0, first, count).to(target).contiguous(), eta, k_max, first, results);
    }
    const json& costs = manifest["gflops"]["per_exit_step"];
    for (size_t i = 0; i < results.size(); ++i) {
      const auto probs = at::softmax(results[i].logits.to(at::kDouble), 0);
      json line = {{"index", i},
                   {"class_index", results[i].logits.argmax().item<int64_t>()},
                   {"exit_step", results[i].exit_step},
                   {"cube_starts", results[i].starts},
                   {"centres", results[i].centres},
                   {"probabilities", std::vector<double>(probs.data_ptr<double>(), probs.data_ptr<double>() + probs.numel())},
                   {"gflops", costs[results[i].exit_step]}};
      std::cout << line.dump() << "\n";
    }
    return 0;
  } catch (const Refusal& e) {
    std::cerr << "adafocus-run: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "adafocus-run: " << e.what() << std::endl;
    return 2;
  }
}
