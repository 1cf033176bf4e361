// The only file that knows Python: argument checks on the exact arrays the core will read or write
// (never a silent converting copy: an in-place update of a copy would be lost), GIL release around the
// core, and C++ exceptions mapped to Python ones (std::invalid_argument -> ValueError by pybind11).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "autorec.h"
#include "fields.h"
#include "gemm.h"
#include "isa.h"
#include "kernels/kernels.h"
#include "mlp.h"
#include "multvae.h"
#include "parallel.h"
#include "prepare.h"
#include "private.h"
#include "sequential.h"
#include "topk.h"
#include "two_tower.h"

namespace py = pybind11;
using namespace fastrec;

namespace {

// Whether float ranges [a, a + na) and [b, b + nb) share memory (compared as addresses: the arrays are unrelated).
bool overlap(const float* a, index_t na, const float* b, index_t nb) {
  const auto ia = reinterpret_cast<std::uintptr_t>(a), ib = reinterpret_cast<std::uintptr_t>(b);
  return ia < ib + sizeof(float) * static_cast<std::uintptr_t>(nb) && ib < ia + sizeof(float) * static_cast<std::uintptr_t>(na);
}

// Around every call into the core: the GIL released, subnormals flushed on this thread (parallel.h).
struct CoreCall {
  py::gil_scoped_release release;
  FlushDenormals flush;
};

// The StopCheck of training calls: between batches, at most every 50 ms, take the GIL, run Python's signal
// handlers and call progress(done) if given. When either raises (Ctrl-C: KeyboardInterrupt) the epoch stops
// at that batch boundary and the exception is kept, to be returned to the Python layer, which raises it once
// its bookkeeping is done.
class PythonSignals {
 public:
  explicit PythonSignals(py::handle progress) : progress_(py::reinterpret_borrow<py::object>(progress)) {}

  bool operator()(index_t done) {
    const auto now = std::chrono::steady_clock::now();
    if (now < next_check_) return false;
    next_check_ = now + std::chrono::milliseconds(50);
    const KeepDenormals python_float_mode;
    py::gil_scoped_acquire gil;
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (!progress_.is_none()) progress_(done);
      return false;
    } catch (py::error_already_set& e) {
      error_ = e.value();
      return true;
    }
  }
  py::object error() const { return error_ ? error_ : py::none(); }

 private:
  py::object progress_;
  std::chrono::steady_clock::time_point next_check_{};
  py::object error_;
};

// (loss_sum, adam_t, rows, diverged, exception or None): what train_epoch returns to Python.
py::tuple epoch_tuple(const EpochResult& r, std::int64_t adam_t, const PythonSignals& signals) {
  return py::make_tuple(r.loss_sum, adam_t, r.rows, r.diverged, signals.error());
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// The array itself (no conversion), checked: dtype T, C-contiguous, ndim, and optionally writeable.
template <class T>
py::array checked(py::handle obj, const std::string& what, int ndim, bool writeable) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(what + " must be a numpy array, got " + std::string(py::str(py::type::of(obj))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<T>()))  // equal, not is: unpickled/memmapped dtypes are new objects
    throw py::type_error(what + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(what + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(what + " must be C-contiguous");
  if (writeable && !a.writeable()) throw py::value_error(what + " must be writeable");
  return a;
}

// The float32 operands of op(a) @ op(b) (the product test hooks), checked, with the product's M, N, K.
struct GemmOperands {
  py::array a, b;
  index_t M, N, K;
  const float* pa() const { return static_cast<const float*>(a.data()); }
  const float* pb() const { return static_cast<const float*>(b.data()); }
};

GemmOperands gemm_operands(py::handle a_obj, py::handle b_obj, bool trans_a, bool trans_b) {
  GemmOperands g{checked<float>(a_obj, "a", 2, false), checked<float>(b_obj, "b", 2, false), 0, 0, 0};
  g.M = trans_a ? g.a.shape(1) : g.a.shape(0);
  g.K = trans_a ? g.a.shape(0) : g.a.shape(1);
  const index_t Kb = trans_b ? g.b.shape(1) : g.b.shape(0);
  g.N = trans_b ? g.b.shape(0) : g.b.shape(1);
  if (g.K != Kb)
    throw py::value_error("op(a) has " + std::to_string(g.K) + " columns but op(b) has " + std::to_string(Kb) +
                          " rows");
  return g;
}

void require_shape(const py::array& a, const std::string& what, index_t rows, index_t cols) {
  const bool ok = a.ndim() == 1 ? a.shape(0) == rows : (a.shape(0) == rows && a.shape(1) == cols);
  if (!ok) {
    const std::string want = a.ndim() == 1 ? "(" + std::to_string(rows) + ",)"
                                           : "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
    throw py::value_error(what + " must have shape " + want + ", got " + shape_str(a));
  }
}

// Parameters: coefs[l] (fan_in, fan_out) and intercepts[l] (fan_out,), chained. Only training needs them
// writeable; a read-only (e.g. memory-mapped) model can still predict.
Network make_network(const py::list& coefs, const py::list& intercepts, const std::string& activation,
                     const std::string& out_activation, bool writeable) {
  if (coefs.size() == 0) throw py::value_error("coefs must hold at least one layer");
  if (coefs.size() != intercepts.size())
    throw py::value_error("coefs and intercepts must have the same length, got " + std::to_string(coefs.size()) +
                          " and " + std::to_string(intercepts.size()));
  Network net;
  net.hidden = parse_activation(activation);
  net.out = parse_activation(out_activation);
  if (net.hidden == Activation::Softmax) throw py::value_error("activation cannot be 'softmax'");
  if (net.out != Activation::Identity && net.out != Activation::Logistic && net.out != Activation::Softmax)
    throw py::value_error("out_activation must be 'identity', 'logistic' or 'softmax', got '" + out_activation + "'");
  for (std::size_t l = 0; l < coefs.size(); ++l) {
    const std::string name = "coefs[" + std::to_string(l) + "]";
    py::array W = checked<float>(coefs[l], name, 2, writeable);
    const index_t fan_in = W.shape(0), fan_out = W.shape(1);
    if (fan_out < 1) throw py::value_error(name + " must have at least one column");
    if (l > 0 && fan_in != net.layers.back().fan_out)
      throw py::value_error(name + " has " + std::to_string(fan_in) + " rows but the previous layer has " +
                            std::to_string(net.layers.back().fan_out) + " outputs");
    py::array b = checked<float>(intercepts[l], "intercepts[" + std::to_string(l) + "]", 1, writeable);
    require_shape(b, "intercepts[" + std::to_string(l) + "]", fan_out, 1);
    // The core never writes parameters outside train_epoch, which asked for writeable arrays above.
    net.layers.push_back(Layer{const_cast<float*>(static_cast<const float*>(W.data())),
                               const_cast<float*>(static_cast<const float*>(b.data())), fan_in, fan_out});
  }
  if (writeable)  // training updates the layers' parameters in parallel: no two arrays may share memory
    for (std::size_t i = 0; i < 2 * net.layers.size(); ++i)
      for (std::size_t j = i + 1; j < 2 * net.layers.size(); ++j) {
        const Layer &a = net.layers[i / 2], &b = net.layers[j / 2];
        if (overlap(i % 2 ? a.b : a.W, i % 2 ? a.fan_out : a.fan_in * a.fan_out, j % 2 ? b.b : b.W,
                    j % 2 ? b.fan_out : b.fan_in * b.fan_out))
          throw py::value_error("coefs and intercepts share memory: each layer needs its own arrays");
      }
  return net;
}

// X: a float32 (n, n_features) array or a CSR tuple (indptr int64, indices int32, data float32, n_cols).
Input make_input(py::handle X, index_t n_features) {
  Input in;
  in.cols = n_features;
  if (py::isinstance<py::tuple>(X)) {
    auto t = py::reinterpret_borrow<py::tuple>(X);
    if (t.size() != 4) throw py::value_error("a CSR X must be the tuple (indptr, indices, data, n_cols)");
    py::array indptr = checked<std::int64_t>(t[0], "X.indptr", 1, false);
    py::array indices = checked<std::int32_t>(t[1], "X.indices", 1, false);
    py::array data = checked<float>(t[2], "X.data", 1, false);
    const auto n_cols = t[3].cast<index_t>();
    if (n_cols != n_features)
      throw py::value_error("X has " + std::to_string(n_cols) + " columns, coefs[0] has " +
                            std::to_string(n_features) + " rows");
    if (indptr.shape(0) < 1) throw py::value_error("X.indptr must have n_rows + 1 entries");
    if (indices.shape(0) != data.shape(0))
      throw py::value_error("X.indices and X.data must have the same length");
    in.sparse = true;
    in.rows = indptr.shape(0) - 1;
    in.csr = CsrView{static_cast<const std::int64_t*>(indptr.data()), static_cast<const std::int32_t*>(indices.data()),
                     static_cast<const float*>(data.data()), in.rows, n_cols};
    // Structure checked once here so no kernel can read out of bounds.
    const index_t nnz = indices.shape(0);
    if (in.csr.indptr[0] != 0 || in.csr.indptr[in.rows] != nnz)
      throw py::value_error("X.indptr must start at 0 and end at len(X.indices)");
    for (index_t i = 0; i < in.rows; ++i)
      if (in.csr.indptr[i + 1] < in.csr.indptr[i]) throw py::value_error("X.indptr must be non-decreasing");
    for (index_t p = 0; p < nnz; ++p)
      if (in.csr.indices[p] < 0 || in.csr.indices[p] >= n_cols)
        throw py::value_error("X.indices must lie in [0, " + std::to_string(n_cols) + ")");
    return in;
  }
  py::array a = checked<float>(X, "X", 2, false);
  if (a.shape(1) != n_features)
    throw py::value_error("X has " + std::to_string(a.shape(1)) + " features, coefs[0] expects " +
                          std::to_string(n_features));
  in.rows = a.shape(0);
  in.dense = static_cast<const float*>(a.data());
  in.ld = n_features;
  return in;
}

const float* checked_targets(py::handle Y, const Network& net, index_t rows) {
  py::array y = checked<float>(Y, "Y", 2, false);
  require_shape(y, "Y", rows, net.layers.back().fan_out);
  return static_cast<const float*>(y.data());
}

std::vector<float*> state_arrays(const py::list& states, const std::string& what, const Network& net) {
  std::vector<float*> out;
  const std::size_t L = net.layers.size();
  for (std::size_t i = 0; i < states.size(); ++i) {
    const Layer& layer = net.layers[i % L];
    const bool is_coef = i < L;
    const std::string name = what + "[" + std::to_string(i) + "]";
    py::array a = checked<float>(states[i], name, is_coef ? 2 : 1, true);
    require_shape(a, name, is_coef ? layer.fan_in : layer.fan_out, layer.fan_out);
    out.push_back(static_cast<float*>(a.mutable_data()));
  }
  return out;
}


// ---- the field model: a dict spec of caller-owned arrays (see python/fastrec/fields.py) ----

template <class T>
T* optional_array(py::handle obj, const std::string& what, index_t size, bool writeable) {
  if (obj.is_none()) return nullptr;
  py::array a = checked<T>(obj, what, 1, writeable);
  if (a.shape(0) != size) throw py::value_error(what + " must have " + std::to_string(size) + " elements");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// Optional sample weights, one per row of X: finite and non-negative (their sum is checked per batch).
const float* checked_sample_weight(py::handle obj, index_t rows) {
  const float* w = optional_array<float>(obj, "sample_weight", rows, false);
  for (index_t i = 0; w && i < rows; ++i)
    if (!(w[i] >= 0.0f) || !std::isfinite(w[i]))
      throw py::value_error("sample_weight must hold finite non-negative numbers; element " + std::to_string(i) +
                            " is " + std::to_string(w[i]));
  return w;
}

template <class T>
T* flat_array(py::handle obj, const std::string& what, index_t size, bool writeable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(what + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(what + " must have dtype " + std::string(py::str(py::dtype::of<T>())));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(what + " must be C-contiguous");
  if (writeable && !a.writeable()) throw py::value_error(what + " must be writeable");
  if (a.size() != size) throw py::value_error(what + " must have " + std::to_string(size) + " elements");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

float* flat_array_or_null(py::handle obj, const std::string& what, index_t size) {
  return obj.is_none() ? nullptr : flat_array<float>(obj, what, size, true);
}

FieldModel make_field_model(const py::dict& spec, bool writeable) {
  FieldModel m;
  m.n_keys = spec["n_keys"].cast<int>();
  m.width = spec["width"].cast<index_t>();
  const std::string loss = spec["loss"].cast<std::string>();
  if (loss != "mse" && loss != "bce" && loss != "tower")
    throw py::value_error("loss must be 'mse', 'bce' or 'tower', got '" + loss + "'");
  m.tower = loss == "tower";
  m.mlp = make_network(spec["coefs"].cast<py::list>(), spec["intercepts"].cast<py::list>(),
                       spec["activation"].cast<std::string>(), loss == "bce" ? "logistic" : "identity", writeable);
  const py::list fields = spec["fields"].cast<py::list>();
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const py::dict f = fields[i].cast<py::dict>();
    const std::string name = "fields[" + std::to_string(i) + "]";
    EmbeddingField e;
    py::array table = checked<float>(f["table"], name + ".table", 2, writeable);
    e.table = static_cast<float*>(const_cast<void*>(table.data()));
    e.vocab = table.shape(0);
    e.dim = table.shape(1);
    const py::tuple bags = f["bags"].cast<py::tuple>();
    py::array indptr = checked<std::int64_t>(bags[0], name + ".bags.indptr", 1, false);
    py::array ids = checked<std::int32_t>(bags[1], name + ".bags.ids", 1, false);
    py::array weights = checked<float>(bags[2], name + ".bags.weights", 1, false);
    if (indptr.shape(0) < 1 || ids.shape(0) != weights.shape(0))
      throw py::value_error(name + ".bags must be (indptr, ids, weights) with len(ids) == len(weights)");
    e.bags = BagTable{static_cast<const std::int64_t*>(indptr.data()), static_cast<const std::int32_t*>(ids.data()),
                      static_cast<const float*>(weights.data()), indptr.shape(0) - 1};
    if (e.bags.indptr[e.bags.rows] != ids.shape(0))
      throw py::value_error(name + ".bags.indptr must end at len(ids)");
    e.key = f["key"].cast<int>();
    e.offset = f["offset"].cast<index_t>();
    e.dropout = f.contains("dropout") ? f["dropout"].cast<float>() : 0.0f;
    e.wide = f.contains("wide") && f["wide"].cast<bool>();
    e.alpha = f.contains("alpha") && !f["alpha"].is_none() ? f["alpha"].cast<float>() : -1.0f;
    if (!(e.dropout >= 0.0f && e.dropout < 1.0f)) throw py::value_error(name + ".dropout must lie in [0, 1)");
    const std::string kind = f.contains("state_kind") ? f["state_kind"].cast<std::string>() : "none";
    const index_t s1_size = kind == "row" ? e.vocab : e.vocab * e.dim;
    e.state1 = f.contains("state1") ? flat_array_or_null(f["state1"], name + ".state1", s1_size) : nullptr;
    e.state1_size = e.state1 ? s1_size : 0;
    e.state2 = f.contains("state2") ? flat_array_or_null(f["state2"], name + ".state2", e.vocab * e.dim) : nullptr;
    // fastrec.dask: optional uint8 (vocab) marks of the rows training updated (set, never cleared, by the core)
    if (f.contains("touched") && !f["touched"].is_none())
      e.touched = flat_array<std::uint8_t>(f["touched"], name + ".touched", e.vocab, true);
    m.fields.push_back(e);
  }
  const py::list dense = spec["dense"].cast<py::list>();
  for (std::size_t b = 0; b < dense.size(); ++b) {
    const py::dict d = dense[b].cast<py::dict>();
    py::array table = checked<float>(d["table"], "dense[" + std::to_string(b) + "].table", 2, false);
    m.dense.push_back(DenseBlock{static_cast<const float*>(table.data()), table.shape(0), table.shape(1),
                                 d["key"].cast<int>(), d["offset"].cast<index_t>()});
  }
  if (spec.contains("gmf") && !spec["gmf"].is_none()) {
    const py::dict g = spec["gmf"].cast<py::dict>();
    m.gmf.field_u = g["field_u"].cast<int>();
    m.gmf.field_v = g["field_v"].cast<int>();
    if (m.gmf.field_u < 0 || m.gmf.field_u >= static_cast<int>(m.fields.size()))
      throw py::value_error("gmf.field_u out of range");
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
    m.gmf.w = flat_array<float>(g["w"], "gmf.w", d, writeable);
    m.gmf.state1 = g.contains("state1") ? flat_array_or_null(g["state1"], "gmf.state1", d) : nullptr;
    m.gmf.state2 = g.contains("state2") ? flat_array_or_null(g["state2"], "gmf.state2", d) : nullptr;
  }
  if (writeable) {  // training updates the fields in parallel: no two may write the same memory
    struct Span {
      const float* begin;
      index_t size;
      std::size_t field;
    };
    std::vector<Span> spans;
    for (std::size_t i = 0; i < m.fields.size(); ++i) {
      const EmbeddingField& f = m.fields[i];
      spans.push_back({f.table, f.vocab * f.dim, i});
      if (f.state1) spans.push_back({f.state1, f.state1_size, i});
      if (f.state2) spans.push_back({f.state2, f.vocab * f.dim, i});
    }
    for (const Span& a : spans)
      for (const Span& b : spans)
        if (a.field < b.field && a.size > 0 && b.size > 0 && overlap(a.begin, a.size, b.begin, b.size))
          throw py::value_error("fields[" + std::to_string(a.field) + "] and fields[" + std::to_string(b.field) +
                                "] share memory in their tables or optimizer states: each field needs its own arrays");
    for (const Span& a : spans)  // the fields' updates also run beside the MLP's
      for (const Layer& layer : m.mlp.layers)
        if (a.size > 0 && (overlap(a.begin, a.size, layer.W, layer.fan_in * layer.fan_out) ||
                           overlap(a.begin, a.size, layer.b, layer.fan_out)))
          throw py::value_error("fields[" + std::to_string(a.field) +
                                "] shares memory with the MLP's coefs or intercepts: each needs its own arrays");
  }
  // ---- bf16 training of the field model: spec["precision"] "float32" (default) or "bf16" (mlp.h Network::bf16),
  // spec["bf16_kernel"] as resolve_bf16_kernel ----
  const std::string precision = spec.contains("precision") ? spec["precision"].cast<std::string>() : "float32";
  if (precision != "float32" && precision != "bf16")
    throw py::value_error("precision must be 'float32' or 'bf16', got '" + precision + "'");
  m.mlp.bf16 = precision == "bf16";
  const std::string bf16_kernel = spec.contains("bf16_kernel") ? spec["bf16_kernel"].cast<std::string>() : "auto";
  m.mlp.bf16_native = m.mlp.bf16 && resolve_bf16_kernel(bf16_kernel, resolve_isa("auto"));
  validate(m);
  for (EmbeddingField& f : m.fields) f.bags.shape = shape_of(f.bags);
  return m;
}

Examples make_examples(const FieldModel& m, const py::list& keys, py::handle y, py::handle weight) {
  Examples ex;
  if (static_cast<int>(keys.size()) != m.n_keys)
    throw py::value_error("keys must hold " + std::to_string(m.n_keys) + " columns, got " + std::to_string(keys.size()));
  for (std::size_t k = 0; k < keys.size(); ++k) {
    py::array a = checked<std::int32_t>(keys[k], "keys[" + std::to_string(k) + "]", 1, false);
    if (k == 0) ex.rows = a.shape(0);
    if (a.shape(0) != ex.rows) throw py::value_error("all key columns must have the same length");
    ex.keys.push_back(static_cast<const std::int32_t*>(a.data()));
  }
  if (m.n_keys == 0) throw py::value_error("the model needs at least one key column");
  ex.y = y.is_none() ? nullptr : optional_array<float>(y, "y", ex.rows, false);
  ex.weight = weight.is_none() ? nullptr : optional_array<float>(weight, "sample_weight", ex.rows, false);
  validate(m, ex);
  return ex;
}

NegativeSampler make_sampler(py::handle obj) {
  NegativeSampler s;
  if (obj.is_none()) return s;
  const py::dict d = obj.cast<py::dict>();
  s.negatives = d["negatives"].cast<int>();
  s.user_key = d["user_key"].cast<int>();
  s.item_key = d["item_key"].cast<int>();
  s.n_items = d["n_items"].cast<index_t>();
  s.seed = d["seed"].cast<std::uint64_t>();
  if (s.negatives < 0) throw py::value_error("negatives must be >= 0");
  if (s.n_items < 1) throw py::value_error("n_items must be >= 1");
  if (d.contains("cdf") && !d["cdf"].is_none()) s.cdf = optional_array<double>(d["cdf"], "cdf", s.n_items, false);
  if (d.contains("seen") && !d["seen"].is_none()) {
    const py::tuple seen = d["seen"].cast<py::tuple>();
    py::array indptr = checked<std::int64_t>(seen[0], "seen.indptr", 1, false);
    py::array items = checked<std::int32_t>(seen[1], "seen.items", 1, false);
    s.seen_indptr = static_cast<const std::int64_t*>(indptr.data());
    s.seen_items = static_cast<const std::int32_t*>(items.data());
    const index_t n_seen = items.shape(0);
    if (indptr.shape(0) < 1 || s.seen_indptr[0] != 0 || s.seen_indptr[indptr.shape(0) - 1] != n_seen)
      throw py::value_error("seen must be (indptr, items) with indptr[0] == 0 and indptr[-1] == len(items)");
    for (index_t u = 0; u + 1 < indptr.shape(0); ++u)  // the core reads items[indptr[u]:indptr[u + 1]]
      if (s.seen_indptr[u + 1] < s.seen_indptr[u]) throw py::value_error("seen.indptr must be non-decreasing");
    s.seen_users = indptr.shape(0) - 1;
  }
  return s;
}


// The row order of an epoch: int64 row numbers in [0, rows).
std::pair<const std::int64_t*, index_t> checked_order(py::handle order_obj, index_t rows, index_t batch_size) {
  py::array order = checked<std::int64_t>(order_obj, "order", 1, false);
  const auto* po = static_cast<const std::int64_t*>(order.data());
  for (index_t i = 0; i < order.shape(0); ++i)
    if (po[i] < 0 || po[i] >= rows)
      throw py::value_error("order must hold row numbers in [0, " + std::to_string(rows) + ")");
  if (batch_size < 1) throw py::value_error("batch_size must be >= 1, got " + std::to_string(batch_size));
  return {po, order.shape(0)};
}

// The optimizer of the dense parameters, its hyper-parameters, and its state arrays checked against net.
Optimizer make_optimizer(const std::string& solver, bool allow_adagrad, const py::list& state1,
                         const py::list& state2, const Network& net, float learning_rate, float momentum,
                         bool nesterov, float beta_1, float beta_2, float epsilon, std::int64_t adam_t) {
  Optimizer opt;
  if (solver == "sgd") opt.solver = Solver::Sgd;
  else if (solver == "adagrad" && allow_adagrad) opt.solver = Solver::Adagrad;
  else if (solver == "adam") opt.solver = Solver::Adam;
  else
    throw py::value_error(std::string(allow_adagrad ? "optimizer must be 'sgd', 'adagrad' or 'adam'"
                                                    : "solver must be 'sgd' or 'adam'") + ", got '" + solver + "'");
  const std::size_t n_params = 2 * net.layers.size();
  if (state1.size() != n_params) throw py::value_error("state1 must hold " + std::to_string(n_params) + " arrays");
  if (state2.size() != (opt.solver == Solver::Adam ? n_params : 0))
    throw py::value_error(opt.solver == Solver::Adam ? "state2 must hold " + std::to_string(n_params) + " arrays"
                                                     : "state2 must be empty for '" + solver + "'");
  opt.state1 = state_arrays(state1, "state1", net);
  opt.state2 = state_arrays(state2, "state2", net);
  opt.learning_rate = learning_rate;
  opt.momentum = momentum;
  opt.nesterov = nesterov;
  opt.beta_1 = beta_1;
  opt.beta_2 = beta_2;
  opt.epsilon = epsilon;
  opt.adam_t = adam_t;
  return opt;
}

// Every embedding field has the optimizer state `solver` needs.
void check_field_states(const FieldModel& model, const Optimizer& opt, const std::string& solver) {
  for (const EmbeddingField& f : model.fields) {
    // Row-wise Adagrad keeps one float per row, lazy Adam a full row per moment.
    const index_t want = opt.solver == Solver::Adagrad ? f.vocab : opt.solver == Solver::Adam ? f.vocab * f.dim : 0;
    if (want && f.state1_size != want)
      throw py::value_error("every field needs state1 of " + std::string(opt.solver == Solver::Adagrad
                                                                              ? "vocab floats (state_kind 'row')"
                                                                              : "vocab x dim floats (state_kind 'full')") +
                            " for optimizer '" + solver + "'");
    if (opt.solver == Solver::Adam && !f.state2) throw py::value_error("every field needs state2 for 'adam'");
  }
}

// A validated field model over the caller's arrays (references kept, so the arrays outlive any change the
// caller makes to its own lists). Built once per fitted model: a call then costs only its own work.
class FieldHandle {
 public:
  FieldHandle(const py::dict& spec, bool trainable) : model_(make_field_model(spec, trainable)), trainable_(trainable) {
    keep_alive(spec);
  }

  py::array_t<float> predict(const py::list& keys, int n_threads, const std::string& isa) const {
    const Examples ex = make_examples(model_, keys, py::none(), py::none());
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    py::array_t<float> out(ex.rows);
    float* po = out.mutable_data();
    {
      const CoreCall call;
      field_predict(ks, model_, ex, po, n_threads, &predict_threads_);
    }
    return out;
  }

  // The output for one example given by its key values: the single-row serving path (no arrays, one thread,
  // the GIL kept: releasing it would cost more than the work).
  float predict_one(const std::int32_t* keys, std::size_t n_keys) const {
    if (static_cast<int>(n_keys) != model_.n_keys)
      throw py::value_error("keys must hold " + std::to_string(model_.n_keys) + " values, got " + std::to_string(n_keys));
    if (!row_) row_ = std::make_unique<RowPredictor>(model_);  // checks the keys (no Examples built per call)
    const FlushDenormals flush;
    return row_->predict(*kernels_, keys);
  }

  // For a serving path that keeps its own RowPredictor (PairScorer): the validated model and predict_one's kernels.
  const FieldModel& model() const { return model_; }
  const KernelSet& row_kernels() const { return *kernels_; }

  py::tuple loss_and_gradients(const py::list& keys, py::handle y, py::handle weight, float alpha, int n_threads,
                               const std::string& isa) const {
    const Examples ex = make_examples(model_, keys, y, weight);
    if (ex.rows < 1 || !ex.y) throw py::value_error("need at least one example and its target y");
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    py::list table_grads, coef_grads, intercept_grads;
    std::vector<float*> tg, gw, gb;
    for (const EmbeddingField& f : model_.fields) {
      py::array_t<float> g({f.vocab, f.dim});
      tg.push_back(g.mutable_data());
      table_grads.append(g);
    }
    for (const Layer& layer : model_.mlp.layers) {
      py::array_t<float> w({layer.fan_in, layer.fan_out}), b(layer.fan_out);
      gw.push_back(w.mutable_data());
      gb.push_back(b.mutable_data());
      coef_grads.append(w);
      intercept_grads.append(b);
    }
    py::object gmf_grad = py::none();
    float* pg = nullptr;
    if (model_.gmf.field_u >= 0) {
      py::array_t<float> g(model_.fields[static_cast<std::size_t>(model_.gmf.field_u)].dim);
      pg = g.mutable_data();
      gmf_grad = g;
    }
    double loss;
    {
      const CoreCall call;
      loss = field_loss_and_gradients(ks, model_, ex, alpha, tg, pg, gw, gb, n_threads);
    }
    return py::make_tuple(loss, table_grads, gmf_grad, coef_grads, intercept_grads);
  }

  py::tuple train_epoch(const py::list& mlp_state1, const py::list& mlp_state2, const py::list& keys, py::handle y,
                        py::handle weight, py::handle order_obj, index_t batch_size, float alpha,
                        const std::string& solver, float learning_rate, float momentum, bool nesterov, float beta_1,
                        float beta_2, float epsilon, std::int64_t adam_t, py::handle sampler_obj,
                        std::uint64_t epoch, int n_threads, const std::string& isa, py::handle progress) {
    if (!trainable_) throw py::value_error("this field model handle was built for prediction only");
    const Examples ex = make_examples(model_, keys, y, weight);
    if (!ex.y) throw py::value_error("y is required for training");
    const auto [po, n_order] = checked_order(order_obj, ex.rows, batch_size);
    Optimizer opt = make_optimizer(solver, true, mlp_state1, mlp_state2, model_.mlp, learning_rate, momentum,
                                   nesterov, beta_1, beta_2, epsilon, adam_t);
    check_field_states(model_, opt, solver);
    if (model_.gmf.field_u >= 0 && !model_.gmf.state1) throw py::value_error("gmf needs state1");
    if (model_.gmf.field_u >= 0 && opt.solver == Solver::Adam && !model_.gmf.state2)
      throw py::value_error("gmf needs state2 for 'adam'");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    if (sampler.negatives > 0) {
      validate(model_, sampler);
      if (sampler.seen_indptr)
        for (index_t r = 0; r < ex.rows; ++r)
          if (ex.keys[static_cast<std::size_t>(sampler.user_key)][r] >= sampler.seen_users)
            throw py::value_error("seen has fewer rows than the user key values");
    }
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    PythonSignals signals(progress);
    EpochResult result;
    {
      const CoreCall call;
      result = field_train_epoch(ks, model_, opt, ex, po, n_order, batch_size, alpha, sampler, epoch,
                                 std::ref(signals), n_threads);
    }
    return epoch_tuple(result, opt.adam_t, signals);
  }

  // ---- Differentially private training (private.h) ----
  // n_steps DP-SGD steps numbered first_step..: (loss_sum, adam_t, rows, diverged, exception or None).
  py::tuple train_private(const py::list& mlp_state1, const py::list& mlp_state2, const py::list& keys, py::handle y,
                          py::handle weight, const py::dict& privacy, float alpha, double denominator,
                          const std::string& solver, float learning_rate, float momentum, bool nesterov,
                          float beta_1, float beta_2, float epsilon, std::int64_t adam_t, py::handle sampler_obj,
                          std::int64_t first_step, std::int64_t n_steps, int n_threads, const std::string& isa,
                          py::handle progress) {
    if (!trainable_) throw py::value_error("this field model handle was built for prediction only");
    const Examples ex = make_examples(model_, keys, y, weight);
    if (!ex.y) throw py::value_error("y is required for training");
    Optimizer opt = make_optimizer(solver, true, mlp_state1, mlp_state2, model_.mlp, learning_rate, momentum,
                                   nesterov, beta_1, beta_2, epsilon, adam_t);
    check_field_states(model_, opt, solver);
    if (model_.gmf.field_u >= 0 && !model_.gmf.state1) throw py::value_error("gmf needs state1");
    if (model_.gmf.field_u >= 0 && opt.solver == Solver::Adam && !model_.gmf.state2)
      throw py::value_error("gmf needs state2 for 'adam'");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    if (sampler.negatives > 0) validate(model_, sampler);
    if (sampler.seen_indptr)
      throw py::value_error("private training draws negatives without seen lists (they are other examples' data)");
    PrivacySettings ps = privacy_settings(privacy);
    for (index_t k = 0; ps.unit_indptr && k < ps.unit_indptr[ps.n_units]; ++k)
      if (ps.unit_rows[k] < 0 || ps.unit_rows[k] >= ex.rows)
        throw py::value_error("privacy['unit_rows'] must lie in [0, number of examples)");
    if (ps.count_group.empty())
      for (std::size_t i = 0; i < model_.fields.size(); ++i) ps.count_group.push_back(static_cast<int>(i));
    check_count_groups(model_, ps);
    if (n_steps < 0 || first_step < 0) throw py::value_error("first_step and n_steps must be >= 0");
    if (!(denominator > 0.0)) throw py::value_error("denominator must be positive");
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    PythonSignals signals(progress);
    EpochResult result;
    {
      const CoreCall call;
      result = field_private_steps(ks, model_, opt, ex, ps, alpha, denominator, sampler, first_step, n_steps,
                                   std::ref(signals), n_threads);
    }
    return epoch_tuple(result, opt.adam_t, signals);
  }

  // Each row's gradient norm before clipping for the batch examples[rows] (+ negatives): a test hook.
  py::array_t<float> example_norms(const py::list& keys, py::handle y, py::handle weight, py::handle rows_obj,
                                   py::handle sampler_obj, const py::dict& privacy, std::int64_t step, int n_threads,
                                   const std::string& isa) const {
    const Examples ex = make_examples(model_, keys, y, weight);
    if (!ex.y) throw py::value_error("y is required");
    py::array rows = checked<std::int64_t>(rows_obj, "rows", 1, false);
    const auto* pr = static_cast<const std::int64_t*>(rows.data());
    for (index_t r = 0; r < rows.shape(0); ++r)
      if (pr[r] < 0 || pr[r] >= ex.rows) throw py::value_error("rows must lie in [0, number of examples)");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    if (sampler.negatives > 0) validate(model_, sampler);
    const PrivacySettings ps = privacy_settings(privacy);
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    py::array_t<float> out(rows.shape(0) * (1 + std::max(sampler.negatives, 0)));
    float* po = out.mutable_data();
    {
      const CoreCall call;
      if (rows.shape(0) > 0)
        field_example_norms(ks, model_, ex, pr, rows.shape(0), sampler, static_cast<std::uint64_t>(step), ps, po,
                            n_threads);
    }
    return out;
  }

  static PrivacySettings privacy_settings(const py::dict& d) {
    PrivacySettings ps;
    ps.noise_multiplier = d["noise_multiplier"].cast<double>();
    ps.max_grad_norm = d["max_grad_norm"].cast<double>();
    ps.sampling_rate = d["sampling_rate"].cast<double>();
    ps.sparse = d["sparse"].cast<bool>();
    ps.count_noise = d["count_noise"].cast<double>();
    ps.threshold = d["threshold"].cast<double>();
    ps.seed = d["seed"].cast<std::uint64_t>();
    if (d.contains("count_group")) ps.count_group = d["count_group"].cast<std::vector<int>>();
    if (!(ps.noise_multiplier >= 0.0) || !(ps.max_grad_norm > 0.0) || !(ps.sampling_rate > 0.0 && ps.sampling_rate <= 1.0))
      throw py::value_error("privacy needs noise_multiplier >= 0, max_grad_norm > 0 and sampling_rate in (0, 1]");
    if (ps.sparse && !(ps.count_noise > 0.0)) throw py::value_error("the sparse mechanism needs count_noise > 0");
    if (d.contains("unit_indptr")) {  // the privacy unit "user": the arrays stay alive in the caller's dict
      const py::object ip_obj = d["unit_indptr"], rows_obj = d["unit_rows"];
      const py::array ip = checked<std::int64_t>(ip_obj, "privacy['unit_indptr']", 1, false);
      const py::array rows = checked<std::int64_t>(rows_obj, "privacy['unit_rows']", 1, false);
      ps.unit_indptr = static_cast<const std::int64_t*>(ip.data());
      ps.unit_rows = static_cast<const std::int64_t*>(rows.data());
      ps.n_units = ip.shape(0) - 1;
      ps.unit_cap = d["unit_cap"].cast<index_t>();
      if (ps.n_units < 1 || ps.unit_cap < 1 || ps.unit_indptr[0] != 0 || ps.unit_indptr[ps.n_units] != rows.shape(0))
        throw py::value_error("privacy needs unit_indptr from 0 to len(unit_rows) over >= 1 units and unit_cap >= 1");
      for (index_t u = 0; u < ps.n_units; ++u)
        if (ps.unit_indptr[u + 1] < ps.unit_indptr[u]) throw py::value_error("privacy['unit_indptr'] must not decrease");
    }
    return ps;
  }

  // What every top-k call checks of the model, the sampler and users[0:n_users]: two key columns, the GMF
  // fields on different sides (one per key column), users non-negative and within the user key's rows and,
  // with `seen`, within the sampler's seen lists (when it has them).
  void check_topk(const NegativeSampler& sampler, const std::int32_t* users, index_t n_users, bool seen) const {
    validate(model_, sampler);
    if (model_.n_keys != 2) throw py::value_error("top-k needs a model of exactly two key columns (user, item)");
    if (model_.gmf.field_u >= 0 &&
        model_.fields[static_cast<std::size_t>(model_.gmf.field_u)].key ==
            model_.fields[static_cast<std::size_t>(model_.gmf.field_v)].key)
      throw py::value_error("top-k needs the two GMF fields on different sides (one per key column)");
    std::int32_t max_user = -1;
    for (index_t u = 0; u < n_users; ++u) {
      if (users[u] < 0) throw py::value_error("users must be non-negative");
      max_user = std::max(max_user, users[u]);
    }
    require_key_rows(model_, sampler.user_key, static_cast<index_t>(max_user) + 1, "the largest user + 1");
    if (seen && sampler.seen_indptr && max_user >= sampler.seen_users)
      throw py::value_error("users out of range of seen");
  }

  // A top-k call's candidates: None -> nullptr; else the int32 array (kept alive in `keep`, its length in n),
  // each within [0, n_items).
  static const std::int32_t* candidate_list(py::handle obj, const NegativeSampler& sampler, py::array& keep,
                                            index_t& n) {
    if (obj.is_none()) return nullptr;
    keep = checked<std::int32_t>(obj, "candidates", 1, false);
    const auto* pc = static_cast<const std::int32_t*>(keep.data());
    n = keep.shape(0);
    for (index_t i = 0; i < n; ++i)
      if (pc[i] < 0 || pc[i] >= sampler.n_items)
        throw py::value_error("candidates must lie in [0, " + std::to_string(sampler.n_items) + ")");
    return pc;
  }

  py::tuple topk(py::handle sampler_obj, py::handle users_obj, py::handle candidates_obj, index_t k, bool exclude_seen,
                 int n_threads, const std::string& isa, double approx_fraction = 0.0) const {
    if (sampler_obj.is_none()) throw py::value_error("top-k needs the sampler dict (keys, n_items, seen)");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
    if (!(approx_fraction >= 0.0 && approx_fraction <= 1.0))
      throw py::value_error("approx_fraction must lie in [0, 1], got " + std::to_string(approx_fraction));
    py::array users = checked<std::int32_t>(users_obj, "users", 1, false);
    const auto* pu = static_cast<const std::int32_t*>(users.data());
    py::array c;
    index_t n_candidates = 0;
    const std::int32_t* pc = candidate_list(candidates_obj, sampler, c, n_candidates);
    const index_t n_users = users.shape(0);
    check_topk(sampler, pu, n_users, true);
    py::array_t<std::int32_t> items({n_users, k});
    py::array_t<float> scores({n_users, k});
    std::int32_t* pi = items.mutable_data();
    float* ps = scores.mutable_data();
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    {
      const CoreCall call;
      field_topk(ks, model_, sampler, pu, n_users, pc, n_candidates, k, exclude_seen, pi, ps, topk_cache_, n_threads,
                 approx_fraction);
    }
    return py::make_tuple(items, scores);
  }

  // The approximate top-k's first stage for one user (field_topk_proxy, a test hook): (sample items int32,
  // surrogate coefficients float32 [fan_out(0) + 1], proxy scores float32 over the candidates).
  py::tuple topk_proxy(py::handle sampler_obj, std::int32_t user, py::handle candidates_obj,
                       const std::string& isa) const {
    if (sampler_obj.is_none()) throw py::value_error("top-k needs the sampler dict (keys, n_items, seen)");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    py::array c;
    index_t n_candidates = 0;
    const std::int32_t* pc = candidate_list(candidates_obj, sampler, c, n_candidates);
    if (!pc) n_candidates = sampler.n_items;
    check_topk(sampler, &user, 1, false);
    py::array_t<float> proxy(n_candidates);
    std::vector<std::int32_t> sample;
    std::vector<float> coef;
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    {
      const CoreCall call;
      field_topk_proxy(ks, model_, sampler, user, pc, n_candidates, topk_cache_, sample, coef, proxy.mutable_data());
    }
    return py::make_tuple(py::array_t<std::int32_t>(static_cast<py::ssize_t>(sample.size()), sample.data()),
                          py::array_t<float>(static_cast<py::ssize_t>(coef.size()), coef.data()), proxy);
  }

  // topk over a candidate list per user (field_topk_candidates): cand_indptr int64 [n_users + 1] and
  // cand_items int32, a CSR whose row u lists the item key values user u ranks.
  py::tuple topk_candidates(py::handle sampler_obj, py::handle users_obj, py::handle indptr_obj,
                            py::handle items_obj, index_t k, bool exclude_seen, int n_threads,
                            const std::string& isa) const {
    if (sampler_obj.is_none()) throw py::value_error("top-k needs the sampler dict (keys, n_items, seen)");
    const NegativeSampler sampler = make_sampler(sampler_obj);
    if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
    py::array users = checked<std::int32_t>(users_obj, "users", 1, false);
    py::array indptr = checked<std::int64_t>(indptr_obj, "cand_indptr", 1, false);
    py::array cand = checked<std::int32_t>(items_obj, "cand_items", 1, false);
    const auto* pu = static_cast<const std::int32_t*>(users.data());
    const auto* pp = static_cast<const std::int64_t*>(indptr.data());
    const auto* pc = static_cast<const std::int32_t*>(cand.data());
    const index_t n_users = users.shape(0), n_cand = cand.shape(0);
    require_shape(indptr, "cand_indptr", n_users + 1, 0);
    if (pp[0] != 0 || pp[n_users] != n_cand)
      throw py::value_error("cand_indptr must start at 0 and end at len(cand_items) (" + std::to_string(n_cand) +
                            ")");
    for (index_t u = 0; u < n_users; ++u)
      if (pp[u + 1] < pp[u]) throw py::value_error("cand_indptr must be non-decreasing");
    for (index_t i = 0; i < n_cand; ++i)
      if (pc[i] < 0 || pc[i] >= sampler.n_items)
        throw py::value_error("cand_items must lie in [0, " + std::to_string(sampler.n_items) + ")");
    check_topk(sampler, pu, n_users, true);
    py::array_t<std::int32_t> items({n_users, k});
    py::array_t<float> scores({n_users, k});
    std::int32_t* pi = items.mutable_data();
    float* ps = scores.mutable_data();
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    {
      const CoreCall call;
      field_topk_candidates(ks, model_, sampler, pu, n_users, pp, pc, k, exclude_seen, pi, ps, topk_cache_,
                            n_threads);
    }
    return py::make_tuple(items, scores);
  }

 private:
  const KernelSet* kernels_ = &kernels_for(resolve_isa("auto"));  // predict_one's
  mutable std::unique_ptr<RowPredictor> row_;  // predict_one's workspace (callers hold the GIL: one at a time)
  void keep_alive(py::handle obj) {
    if (py::isinstance<py::array>(obj)) {
      keep_.push_back(py::reinterpret_borrow<py::object>(obj));
    } else if (py::isinstance<py::dict>(obj)) {
      for (auto item : py::reinterpret_borrow<py::dict>(obj)) keep_alive(item.second);
    } else if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
      for (auto item : obj) keep_alive(item);
    }
  }

  FieldModel model_;
  bool trainable_;
  std::vector<py::object> keep_;
  mutable TopkCache topk_cache_;  // see fields.h
  mutable SharedThreadChoice predict_threads_;  // the thread choice of this model's predict calls (parallel.h)
};


// A validated two-tower model over the caller's arrays: two field-model specs with loss "tower".
// Entity numbers of raw int ids: binary search of the sorted ids, through the order of ids added after fit
// (IdIndex's arrays). The single-row paths' lookups (PairScorer, FieldModel's one-row dict).
class IdLookup {
 public:
  IdLookup(py::array_t<std::int64_t, py::array::c_style> s, const py::object& o) : sorted(std::move(s)) {
    has_order = !o.is_none();
    if (has_order) order = o.cast<py::array_t<std::int64_t, py::array::c_style>>();
    if (!(sorted.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) ||
        (has_order && !(order.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)))
      throw py::value_error("ids and order must be aligned");
    if (has_order && order.size() != sorted.size()) throw py::value_error("order must have as many entries as ids");
  }
  // Entity number of raw id x (1-based), 0 when unknown.
  std::int32_t entity(std::int64_t x) const {
    const std::int64_t* a = sorted.data();
    const std::int64_t n = sorted.size();
    const std::int64_t p = std::lower_bound(a, a + n, x) - a;
    if (p == n || a[p] != x) return 0;
    return static_cast<std::int32_t>((has_order ? order.data()[p] : p) + 1);
  }

 private:
  py::array_t<std::int64_t, py::array::c_style> sorted;
  py::array_t<std::int64_t, py::array::c_style> order;
  bool has_order = false;
};

// Recommender.predict of one (user, item) pair of int ids, whole: both id lookups (binary searches of the sorted
// ids, through the order of ids added after fit), the example, the rating mean and the clipping, in one call.
// Its RowPredictor reads 64-byte aligned copies of the MLP's weights made at construction: the scorer belongs to
// one prediction handle (Python builds a new one with each new handle), and like the handle's other state it
// does not see a later in-place change of the model's arrays.
class PairScorer {
 public:
  PairScorer(py::object handle, py::array_t<std::int64_t, py::array::c_style> user_sorted, py::object user_order,
             py::array_t<std::int64_t, py::array::c_style> item_sorted, py::object item_order, double mean,
             double low, double high)
      : handle_obj_(std::move(handle)),
        handle_(handle_obj_.cast<const FieldHandle*>()),
        sides_{IdLookup(std::move(user_sorted), user_order), IdLookup(std::move(item_sorted), item_order)},
        mean_(mean),
        low_(low),
        high_(high),
        dtype_(py::dtype::of<double>()) {
    if (handle_->model().n_keys != 2) throw py::value_error("PairScorer needs a model with two key columns");
    row_ = std::make_unique<RowPredictor>(handle_->model(), true);
  }

  // predict's value of one pair: the score + mean, clipped (np.clip of a float64: the same min and max).
  double score(std::int64_t user, std::int64_t item) const {
    const std::int32_t keys[2] = {sides_[0].entity(user), sides_[1].entity(item)};
    float out;
    {
      const FlushDenormals flush;
      out = row_->predict(handle_->row_kernels(), keys);
    }
    return std::min(std::max(static_cast<double>(out) + mean_, low_), high_);
  }

  // score of each pair (users[j], items[j]): predict's small-array path (row by row: no batch tables built).
  py::array_t<double> scores(const py::array_t<std::int64_t, py::array::c_style>& users,
                             const py::array_t<std::int64_t, py::array::c_style>& items) const {
    if (users.ndim() != 1 || items.ndim() != 1 || users.size() != items.size())
      throw py::value_error("users and items must be 1-D arrays of the same length");
    py::array_t<double> out(users.size());
    double* o = out.mutable_data();
    const std::int64_t *u = users.data(), *i = items.data();
    for (py::ssize_t j = 0; j < users.size(); ++j) o[j] = score(u[j], i[j]);
    return out;
  }

  // A float64 array of one holding value, made straight from the cached float64 dtype: py::array_t<double>(1)
  // looks the dtype up and builds shape and stride vectors, a fifth of the call's time. nullptr on failure
  // (a Python error set).
  PyObject* array_of_one(double value) const {
    const auto& api = py::detail::npy_api::get();
    const Py_intptr_t dims[1] = {1};
    PyObject* arr = api.PyArray_NewFromDescr_(api.PyArray_Type_, dtype_.inc_ref().ptr(), 1, dims, nullptr, nullptr, 0,
                                              nullptr);  // steals the dtype reference
    if (arr) *reinterpret_cast<double*>(py::detail::array_proxy(arr)->data) = value;
    return arr;
  }

  py::array_t<double> operator()(std::int64_t user, std::int64_t item) const {
    PyObject* arr = array_of_one(score(user, item));
    if (!arr) throw py::error_already_set();
    return py::reinterpret_steal<py::array_t<double>>(arr);
  }

  // (predict_lists(users, items), score_ints(user, item)): plain CPython functions (no pybind11 dispatch, no
  // argument conversion) bound to this scorer. predict_lists takes two lists of one int each and returns
  // operator()'s array; score_ints two ints and returns score's float. Both return None for anything else
  // (other types, bool, ints beyond int64, a failure in the core): the caller's checked path then says what is
  // wrong. An unknown id is scored as the checked path scores it (entity 0: the unknown rows).
  static py::tuple fast_calls(const py::object& self) {
    auto* scorer = self.cast<PairScorer*>();
    PyObject* capsule = PyCapsule_New(scorer, nullptr, [](PyObject* c) {
      Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(c)));  // the scorer, kept alive by the capsule
    });
    if (!capsule) throw py::error_already_set();
    py::object cap = py::reinterpret_steal<py::object>(capsule);
    if (PyCapsule_SetContext(capsule, self.ptr()) != 0) throw py::error_already_set();
    Py_INCREF(self.ptr());
    static PyMethodDef lists_def{"predict_lists", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_lists)),
                                 METH_FASTCALL, "Recommender.predict([user], [item]) for two int ids, or None."};
    static PyMethodDef ints_def{"score_ints", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_ints)),
                                METH_FASTCALL, "The serving handle's float for two int ids, or None."};
    PyObject* lists = PyCFunction_NewEx(&lists_def, capsule, nullptr);
    if (!lists) throw py::error_already_set();
    py::object lists_obj = py::reinterpret_steal<py::object>(lists);
    PyObject* ints = PyCFunction_NewEx(&ints_def, capsule, nullptr);
    if (!ints) throw py::error_already_set();
    return py::make_tuple(lists_obj, py::reinterpret_steal<py::object>(ints));
  }

 private:
  // The int64 value of an exact Python int (not a bool or a subclass); false when it is not one or overflows.
  static bool exact_int64(PyObject* o, std::int64_t* out) {
    if (!PyLong_CheckExact(o)) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    *out = static_cast<std::int64_t>(v);
    return true;
  }

  // The capsule's scorer with the pair's score in *out, or nullptr (no Python error left set) when the core
  // refused the pair.
  static const PairScorer* try_score(PyObject* capsule, std::int64_t user, std::int64_t item, double* out) {
    const auto* scorer = static_cast<const PairScorer*>(PyCapsule_GetPointer(capsule, nullptr));
    if (!scorer) {
      PyErr_Clear();
      return nullptr;
    }
    try {
      *out = scorer->score(user, item);
      return scorer;
    } catch (...) {  // the checked path repeats the call and reports the error
      return nullptr;
    }
  }

  static PyObject* fast_lists(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
    std::int64_t user, item;
    double value;
    if (nargs == 2 && PyList_CheckExact(args[0]) && PyList_CheckExact(args[1]) && PyList_GET_SIZE(args[0]) == 1 &&
        PyList_GET_SIZE(args[1]) == 1 && exact_int64(PyList_GET_ITEM(args[0], 0), &user) &&
        exact_int64(PyList_GET_ITEM(args[1], 0), &item))
      if (const PairScorer* scorer = try_score(capsule, user, item, &value)) return scorer->array_of_one(value);
    Py_RETURN_NONE;
  }

  static PyObject* fast_ints(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
    std::int64_t user, item;
    double value;
    if (nargs == 2 && exact_int64(args[0], &user) && exact_int64(args[1], &item) &&
        try_score(capsule, user, item, &value))
      return PyFloat_FromDouble(value);
    Py_RETURN_NONE;
  }

  py::object handle_obj_;  // keeps the handle (and so its arrays) alive
  const FieldHandle* handle_;
  IdLookup sides_[2];
  double mean_, low_, high_;
  py::dtype dtype_;  // float64, for the output array
  std::unique_ptr<RowPredictor> row_;  // over aligned copies of the MLP (callers hold the GIL: one at a time)
};

// ---- Single-row serving (issue 17): the serving handles' calls, whole in the core ----
// One FieldModel row (a dict: column name -> a scalar, or a one-element list or 1-D array) written into the
// one-row tables of the model's serving handle (a code per categorical column, the standardised value per
// numeric one), then RowPredictor: the Python one-row path's work without a Python step per column. Returns
// None, writing nothing the general path would miss, when the row is anything else (the general path checks it
// and says what is wrong).
class RowScorer {
 public:
  // columns: per column (name, kind, cell, lookup, buckets, mean, std); kind "id" (int ids: lookup is an
  // IdLookup), "hash" (hash_buckets), "call" (lookup(value) -> code or None), "numeric" ((value - mean) / std
  // into the float32 cell). The cells are the handle's one-row tables (int32 codes, float32 values).
  RowScorer(py::object handle, const py::list& columns) : handle_obj_(std::move(handle)) {
    handle_ = handle_obj_.cast<const FieldHandle*>();
    for (const py::handle c : columns) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(c);
      Column col;
      col.name = py::reinterpret_borrow<py::object>(t[0]);
      const std::string kind = t[1].cast<std::string>();
      col.cell = py::reinterpret_borrow<py::array>(t[2]);
      if (col.cell.size() < 1 || !(col.cell.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) ||
          !col.cell.writeable())
        throw py::value_error("every column needs a writeable one-element cell");
      col.data = col.cell.mutable_data();
      col.kind = kind == "id" ? Kind::Id : kind == "hash" ? Kind::Hash : kind == "call" ? Kind::Call : Kind::Numeric;
      if (kind != "numeric" && kind != "id" && kind != "hash" && kind != "call")
        throw py::value_error("unknown column kind '" + kind + "'");
      const bool numeric = col.kind == Kind::Numeric;
      if (numeric ? !py::isinstance<py::array_t<float>>(col.cell) : !py::isinstance<py::array_t<std::int32_t>>(col.cell))
        throw py::value_error("column '" + py::str(col.name).cast<std::string>() + "': cell of the wrong dtype");
      col.lookup = py::reinterpret_borrow<py::object>(t[3]);
      if (col.kind == Kind::Id) col.ids = col.lookup.cast<const IdLookup*>();
      col.buckets = t[4].cast<std::int64_t>();
      if (col.kind == Kind::Hash && (col.buckets < 1 || col.buckets >= (std::int64_t{1} << 31) - 1))
        throw py::value_error("hash buckets must be in [1, 2**31 - 2]");
      col.mean = t[5].cast<double>();
      col.std = t[6].cast<double>();
      columns_.push_back(std::move(col));
    }
  }

  // The model's output for `row` (probability for "bce", value for "mse"), or None. scalars: the values are
  // the row's scalars themselves (the serving handle), else one-element lists or arrays (predict's dict).
  py::object operator()(const py::handle row, bool scalars) const {
    if (!PyDict_CheckExact(row.ptr()) || PyDict_GET_SIZE(row.ptr()) != static_cast<Py_ssize_t>(columns_.size()))
      return py::none();
    for (const Column& col : columns_) {
      PyObject* given = PyDict_GetItemWithError(row.ptr(), col.name.ptr());  // borrowed
      if (!given) {
        PyErr_Clear();  // (an unhashable key cannot be in a dict of str keys)
        return py::none();
      }
      Value v;
      if (!value_of(given, scalars, v) || !write(col, v)) return py::none();
    }
    const std::int32_t key = 0;  // every table is one row: the handle reads row 0 of each
    return py::float_(static_cast<double>(handle_->predict_one(&key, 1)));
  }

 private:
  enum class Kind { Id, Hash, Call, Numeric };
  struct Column {
    py::object name;
    Kind kind = Kind::Numeric;
    py::array cell;
    void* data = nullptr;  // the cell's element
    py::object lookup;
    const IdLookup* ids = nullptr;
    std::int64_t buckets = 0;
    double mean = 0.0, std = 1.0;
  };
  // One value as Python's one-row path reads it: an exact int (not bool), float or str; numpy scalars as their
  // .item(). `obj` keeps a value made here alive.
  struct Value {
    enum { Int, Float, Str } type = Int;
    std::int64_t i = 0;
    bool int_overflow = false;
    double f = 0.0;
    PyObject* ref = nullptr;  // the Python object (int or str), borrowed from the row or owned by obj
    py::object obj;
  };

  static bool from_object(PyObject* x, Value& v) {
    if (PyLong_CheckExact(x)) {
      int overflow = 0;
      v.type = Value::Int;
      v.i = PyLong_AsLongLongAndOverflow(x, &overflow);
      v.int_overflow = overflow != 0;
      v.ref = x;
      return true;
    }
    if (PyFloat_CheckExact(x)) {
      v.type = Value::Float;
      v.f = PyFloat_AS_DOUBLE(x);
      return true;
    }
    if (PyUnicode_CheckExact(x)) {
      v.type = Value::Str;
      v.ref = x;
      return true;
    }
    return false;
  }

  static bool value_of(PyObject* given, bool scalars, Value& v) {
    const auto& api = py::detail::npy_api::get();
    if (!scalars && PyList_CheckExact(given)) {
      if (PyList_GET_SIZE(given) != 1) return false;
      given = PyList_GET_ITEM(given, 0);
    } else if (!scalars && Py_TYPE(given) == api.PyArray_Type_) {
      const auto* a = py::detail::array_proxy(given);
      if (a->nd != 1 || a->dimensions[0] != 1) return false;
      const auto* d = py::detail::array_descriptor_proxy(a->descr);
      if (d->byteorder != '>') {  // the common dtypes read in place (.item() costs about as much as the row)
        if (d->type_num == py::detail::npy_api::NPY_INT64_ ||
            (d->type_num == py::detail::npy_api::NPY_LONGLONG_ && sizeof(long long) == 8)) {
          std::int64_t x;
          std::memcpy(&x, a->data, sizeof(x));
          v.type = Value::Int;
          v.i = x;
          v.obj = py::reinterpret_steal<py::object>(PyLong_FromLongLong(x));  // the hash and call kinds read it
          v.ref = v.obj.ptr();
          return v.ref != nullptr;
        }
        if (d->type_num == py::detail::npy_api::NPY_INT32_) {
          std::int32_t x;
          std::memcpy(&x, a->data, sizeof(x));
          v.type = Value::Int;
          v.i = x;
          v.obj = py::reinterpret_steal<py::object>(PyLong_FromLong(x));
          v.ref = v.obj.ptr();
          return v.ref != nullptr;
        }
        if (d->type_num == py::detail::npy_api::NPY_DOUBLE_ || d->type_num == py::detail::npy_api::NPY_FLOAT_) {
          v.type = Value::Float;
          if (d->type_num == py::detail::npy_api::NPY_DOUBLE_) std::memcpy(&v.f, a->data, sizeof(double));
          else {
            float x;
            std::memcpy(&x, a->data, sizeof(x));
            v.f = x;
          }
          return true;
        }
      }
      PyObject* item = PySequence_GetItem(given, 0);
      if (!item) {
        PyErr_Clear();
        return false;
      }
      v.obj = py::reinterpret_steal<py::object>(item);
      given = item;
    }
    if (!PyLong_CheckExact(given) && !PyFloat_CheckExact(given) && !PyUnicode_CheckExact(given)) {
      // numpy scalars (np.generic) read as their .item(); anything else is not a one-row value
      if (!PyObject_IsInstance(given, generic_type())) {
        if (PyErr_Occurred()) PyErr_Clear();
        return false;
      }
      PyObject* item = PyObject_CallMethod(given, "item", nullptr);
      if (!item) {
        PyErr_Clear();
        return false;
      }
      v.obj = py::reinterpret_steal<py::object>(item);
      given = item;
    }
    return from_object(given, v);
  }

  static PyObject* generic_type() {
    static PyObject* t = py::object(py::module_::import("numpy").attr("generic")).release().ptr();  // kept for the process
    return t;
  }

  static constexpr double kFloat32Max = 3.4028234663852886e38;

  bool write(const Column& col, const Value& v) const {
    if (col.kind == Kind::Numeric) {
      double x;
      if (v.type == Value::Float) {
        x = v.f;
      } else if (v.type == Value::Int) {
        x = PyLong_AsDouble(v.ref);  // Python's int - float: the int rounded to double (OverflowError: too large)
        if (x == -1.0 && PyErr_Occurred()) {
          PyErr_Clear();
          return false;
        }
      } else {
        return false;
      }
      const double scaled = (x - col.mean) / col.std;
      if (!(std::abs(scaled) <= kFloat32Max)) return false;  // NaN, infinity, too large: the general path says so
      *static_cast<float*>(col.data) = static_cast<float>(scaled);
      return true;
    }
    if (v.type == Value::Float) return false;
    std::int32_t code = 0;
    if (col.kind == Kind::Id) {
      if (v.type != Value::Int || v.int_overflow) return false;  // str ids of int columns: the general path
      code = col.ids->entity(v.i);
    } else if (col.kind == Kind::Hash) {
      char digits[24];
      const char* text = digits;
      Py_ssize_t size = 0;
      if (v.type == Value::Int) {
        if (v.int_overflow) {  // beyond int64: the general path
          return false;
        }
        size = std::to_chars(digits, digits + sizeof(digits), v.i).ptr - digits;
      } else {
        text = PyUnicode_AsUTF8AndSize(v.ref, &size);
        if (!text) {  // lone surrogates
          PyErr_Clear();
          return false;
        }
        while (size > 0 && text[size - 1] == '\0') --size;  // as the batch path's NumPy strings drop them
      }
      const std::uint32_t crc = crc32(reinterpret_cast<const unsigned char*>(text), static_cast<std::size_t>(size));
      code = static_cast<std::int32_t>(static_cast<std::int64_t>(crc) % col.buckets + 1);
    } else {
      PyObject* r = PyObject_CallOneArg(col.lookup.ptr(), v.ref);
      if (!r) {
        PyErr_Clear();
        return false;
      }
      const py::object res = py::reinterpret_steal<py::object>(r);
      if (!PyLong_CheckExact(r)) return false;  // None: not this column's kind of id
      code = static_cast<std::int32_t>(PyLong_AsLong(r));
    }
    *static_cast<std::int32_t*>(col.data) = code;
    return true;
  }

  py::object handle_obj_;  // keeps the handle (and so its tables) alive
  const FieldHandle* handle_;
  std::vector<Column> columns_;
};

class TwoTowerHandle {
 public:
  TwoTowerHandle(const py::dict& user_spec, const py::dict& item_spec, bool normalize, float temperature,
                 bool trainable)
      : trainable_(trainable) {
    model_.user = make_field_model(user_spec, trainable);
    model_.item = make_field_model(item_spec, trainable);
    model_.normalize = normalize;
    model_.temperature = temperature;
    validate(model_);
    keep_.push_back(user_spec);
    keep_.push_back(item_spec);
  }

  index_t dim() const { return model_.dim(); }

  // Each key's vector (normalised when the model normalises) times scale: float32 (n, dim).
  py::array_t<float> vectors(bool user_side, py::handle keys_obj, float scale, int n_threads,
                             const std::string& isa) const {
    py::array keys = checked<std::int32_t>(keys_obj, "keys", 1, false);
    const auto* pk = static_cast<const std::int32_t*>(keys.data());
    Examples ex;
    ex.keys = {pk};
    ex.rows = keys.shape(0);
    validate(user_side ? model_.user : model_.item, ex);
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    py::array_t<float> out({ex.rows, model_.dim()});
    float* po = out.mutable_data();
    {
      const CoreCall call;
      if (ex.rows > 0) tower_vectors(ks, model_, user_side, pk, ex.rows, scale, po, n_threads);
    }
    return out;
  }

  py::tuple loss_and_gradients(py::handle users, py::handle items, py::handle y, py::handle weight,
                               py::handle training_obj, py::handle negatives_obj, float alpha, int n_threads,
                               const std::string& isa) const {
    const TowerPairs pairs = make_pairs(users, items, y, weight);
    if (pairs.rows < 1) throw py::value_error("need at least one pair");
    const TowerTraining training = make_training(training_obj, pairs);
    py::array negatives = checked<std::int32_t>(negatives_obj, "negatives", 1, false);
    const auto* pn = static_cast<const std::int32_t*>(negatives.data());
    const index_t n_neg = negatives.shape(0);
    const index_t want = training.loss == TowerLoss::Softmax ? training.negatives
                         : training.loss == TowerLoss::Mse  ? 0
                                                            : pairs.rows * training.negatives;
    if (n_neg != want)
      throw py::value_error("negatives must hold " + std::to_string(want) + " items, got " + std::to_string(n_neg));
    for (index_t i = 0; i < n_neg; ++i)
      if (pn[i] < 0 || pn[i] >= training.sampler.n_items) throw py::value_error("negatives out of range");
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    py::list out;
    TowerGradients grads[2];
    for (int side = 0; side < 2; ++side) {
      const FieldModel& tower = side == 0 ? model_.user : model_.item;
      py::list tables, coefs, intercepts;
      for (const EmbeddingField& f : tower.fields) {
        py::array_t<float> g({f.vocab, f.dim});
        grads[side].tables.push_back(g.mutable_data());
        tables.append(g);
      }
      for (const Layer& layer : tower.mlp.layers) {
        py::array_t<float> w({layer.fan_in, layer.fan_out}), b(layer.fan_out);
        grads[side].coefs.push_back(w.mutable_data());
        grads[side].intercepts.push_back(b.mutable_data());
        coefs.append(w);
        intercepts.append(b);
      }
      out.append(py::make_tuple(tables, coefs, intercepts));
    }
    double loss;
    {
      const CoreCall call;
      loss = two_tower_loss_and_gradients(ks, model_, training, pairs, pn, n_neg, alpha, grads[0], grads[1],
                                          n_threads);
    }
    return py::make_tuple(loss, out[0], out[1]);
  }

  py::tuple train_epoch(const py::list& user_state1, const py::list& user_state2, const py::list& item_state1,
                        const py::list& item_state2, py::handle users, py::handle items, py::handle y,
                        py::handle weight, py::handle order_obj, index_t batch_size, float alpha,
                        const std::string& solver, float learning_rate, float momentum, bool nesterov, float beta_1,
                        float beta_2, float epsilon, std::int64_t adam_t, py::handle training_obj,
                        std::uint64_t epoch, int n_threads, const std::string& isa, py::handle progress) {
    if (!trainable_) throw py::value_error("this two-tower handle was built for prediction only");
    const TowerPairs pairs = make_pairs(users, items, y, weight);
    const TowerTraining training = make_training(training_obj, pairs);
    const auto [po, n_order] = checked_order(order_obj, pairs.rows, batch_size);
    Optimizer opt_user = make_optimizer(solver, true, user_state1, user_state2, model_.user.mlp, learning_rate,
                                        momentum, nesterov, beta_1, beta_2, epsilon, adam_t);
    Optimizer opt_item = make_optimizer(solver, true, item_state1, item_state2, model_.item.mlp, learning_rate,
                                        momentum, nesterov, beta_1, beta_2, epsilon, adam_t);
    check_field_states(model_.user, opt_user, solver);
    check_field_states(model_.item, opt_item, solver);
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    PythonSignals signals(progress);
    EpochResult result;
    {
      const CoreCall call;
      result = two_tower_train_epoch(ks, model_, training, opt_user, opt_item, pairs, po, n_order, batch_size, alpha,
                                     epoch, std::ref(signals), n_threads);
    }
    return epoch_tuple(result, opt_user.adam_t, signals);
  }

 private:
  TowerPairs make_pairs(py::handle users_obj, py::handle items_obj, py::handle y, py::handle weight) const {
    py::array users = checked<std::int32_t>(users_obj, "users", 1, false);
    py::array items = checked<std::int32_t>(items_obj, "items", 1, false);
    if (users.shape(0) != items.shape(0)) throw py::value_error("users and items must have the same length");
    TowerPairs p;
    p.rows = users.shape(0);
    p.users = static_cast<const std::int32_t*>(users.data());
    p.items = static_cast<const std::int32_t*>(items.data());
    p.y = y.is_none() ? nullptr : optional_array<float>(y, "y", p.rows, false);
    p.weight = weight.is_none() ? nullptr : optional_array<float>(weight, "sample_weight", p.rows, false);
    validate(model_, p);
    return p;
  }

  // {"loss": "softmax" | "bpr" | "bce" | "mse", "negatives": int, "item_prob": float32 (n_items,) or None,
  //  "n_items", "seed", and for bpr/bce optionally "cdf" and "seen" as the field model's sampler}.
  TowerTraining make_training(py::handle obj, const TowerPairs& pairs) const {
    const py::dict d = obj.cast<py::dict>();
    TowerTraining t;
    const std::string loss = d["loss"].cast<std::string>();
    if (loss == "softmax") t.loss = TowerLoss::Softmax;
    else if (loss == "bpr") t.loss = TowerLoss::Bpr;
    else if (loss == "bce") t.loss = TowerLoss::Bce;
    else if (loss == "mse") t.loss = TowerLoss::Mse;
    else throw py::value_error("loss must be 'softmax', 'bpr', 'bce' or 'mse', got '" + loss + "'");
    t.negatives = d["negatives"].cast<int>();
    if (t.negatives < 0) throw py::value_error("negatives must be >= 0");
    if (t.loss == TowerLoss::Bpr && t.negatives < 1) throw py::value_error("bpr needs negatives >= 1");
    if (t.loss == TowerLoss::Mse && !pairs.y) throw py::value_error("mse needs targets y");
    py::dict sampler;
    sampler["negatives"] = t.negatives;
    sampler["user_key"] = 0;
    sampler["item_key"] = 1;
    sampler["n_items"] = d["n_items"];
    sampler["seed"] = d["seed"];
    if (d.contains("cdf")) sampler["cdf"] = d["cdf"];
    if (d.contains("seen")) sampler["seen"] = d["seen"];
    t.sampler = make_sampler(sampler);
    require_key_rows(model_.item, 0, t.sampler.n_items, "n_items");
    if (t.sampler.seen_indptr)
      for (index_t r = 0; r < pairs.rows; ++r)
        if (pairs.users[r] >= t.sampler.seen_users) throw py::value_error("seen has fewer rows than the users");
    if (d.contains("item_prob") && !d["item_prob"].is_none()) {
      t.item_prob = optional_array<float>(d["item_prob"], "item_prob", t.sampler.n_items, false);
      for (index_t i = 0; i < t.sampler.n_items; ++i)
        if (!(t.item_prob[i] >= 0.0f && t.item_prob[i] <= 1.0f))
          throw py::value_error("item_prob must hold probabilities in [0, 1]");
    }
    return t;
  }

  TwoTowerModel model_;
  bool trainable_;
  std::vector<py::object> keep_;
};


// ---- the sequential model (docs/DESIGN.md, "Sequential model (issue 13)"; cpp/sequential.h) ----

const char* const kSeqBlockKeys[kSeqBlockArrays] = {"ln1_gamma", "ln1_beta", "Wq", "bq", "Wk", "bk", "Wv", "bv",
                                                   "Wo", "bo", "ln2_gamma", "ln2_beta", "W1", "b1", "W2", "b2"};

py::handle dict_item(const py::dict& d, const char* key, const std::string& where) {
  if (!d.contains(key)) throw py::value_error(where + " has no key '" + key + "'");
  return d[key];
}

// The arrays of a params-shaped dict (params itself, a state or a gradient dict), visited in canonical order
// with their names: fn(index, name, object).
template <class Fn>
void visit_seq_dict(const py::dict& d, const std::string& what, std::size_t n_blocks, Fn&& fn) {
  fn(0, what + "['item_table']", dict_item(d, "item_table", what));
  fn(1, what + "['position_table']", dict_item(d, "position_table", what));
  py::handle blocks_obj = dict_item(d, "blocks", what);
  if (!py::isinstance<py::list>(blocks_obj) && !py::isinstance<py::tuple>(blocks_obj))
    throw py::value_error(what + "['blocks'] must be a list of dicts");
  const py::sequence blocks = py::reinterpret_borrow<py::sequence>(blocks_obj);
  if (n_blocks != static_cast<std::size_t>(-1) && blocks.size() != n_blocks)
    throw py::value_error(what + "['blocks'] must hold " + std::to_string(n_blocks) + " blocks, got " +
                          std::to_string(blocks.size()));
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const std::string where = what + "['blocks'][" + std::to_string(b) + "]";
    if (!py::isinstance<py::dict>(blocks[b])) throw py::value_error(where + " must be a dict");
    const py::dict blk = blocks[b].cast<py::dict>();
    for (int k = 0; k < kSeqBlockArrays; ++k)
      fn(SeqModel::block_index(static_cast<int>(b), k), where + "['" + kSeqBlockKeys[k] + "']",
         dict_item(blk, kSeqBlockKeys[k], where));
  }
  const std::size_t last = 2 + kSeqBlockArrays * blocks.size();
  fn(last, what + "['final_gamma']", dict_item(d, "final_gamma", what));
  fn(last + 1, what + "['final_beta']", dict_item(d, "final_beta", what));
}

void require_seq_shape(const py::array& a, const std::string& what, std::pair<index_t, index_t> shape) {
  const int ndim = shape.second ? 2 : 1;
  if (a.ndim() != ndim || a.shape(0) != shape.first || (ndim == 2 && a.shape(1) != shape.second)) {
    const std::string want = ndim == 1 ? "(" + std::to_string(shape.first) + ",)"
                                       : "(" + std::to_string(shape.first) + ", " + std::to_string(shape.second) + ")";
    throw py::value_error(what + " must have shape " + want + ", got " + shape_str(a));
  }
}

// A validated sequential model over the caller's params dict (float32 C-contiguous arrays, referenced: the
// references are kept, so the arrays outlive any change the caller makes to the dict).
class SequentialHandle {
 public:
  SequentialHandle(const py::dict& params, bool trainable, const std::string& precision,
                   const std::string& bf16_kernel)
      : trainable_(trainable), precision_(precision), bf16_kernel_(bf16_kernel) {
    if (precision != "float32" && precision != "bf16")
      throw py::value_error("precision must be 'float32' or 'bf16', got '" + precision + "'");
    if (bf16_kernel != "auto" && bf16_kernel != "emulated" && bf16_kernel != "avx512_bf16")
      throw py::value_error("bf16_kernel must be 'auto', 'avx512_bf16' or 'emulated', got '" + bf16_kernel + "'");
    const py::handle heads = dict_item(params, "heads", "params");
    const py::handle blocks_obj = dict_item(params, "blocks", "params");
    if (!py::isinstance<py::list>(blocks_obj) && !py::isinstance<py::tuple>(blocks_obj))
      throw py::value_error("params['blocks'] must be a list of dicts");
    const py::sequence blocks = py::reinterpret_borrow<py::sequence>(blocks_obj);
    // Sizes from the item table, the position table and each block's W1, then every shape checked.
    py::array E = checked<float>(dict_item(params, "item_table", "params"), "params['item_table']", 2, trainable);
    py::array P = checked<float>(dict_item(params, "position_table", "params"), "params['position_table']", 2,
                                 trainable);
    std::vector<index_t> ffn;
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      const std::string where = "params['blocks'][" + std::to_string(b) + "]";
      if (!py::isinstance<py::dict>(blocks[b])) throw py::value_error(where + " must be a dict");
      py::array W1 = checked<float>(dict_item(blocks[b].cast<py::dict>(), "W1", where), where + "['W1']", 2, trainable);
      ffn.push_back(W1.shape(1));
    }
    int h = 0;
    try {
      h = heads.cast<int>();
    } catch (const py::cast_error&) {
      throw py::value_error("params['heads'] must be an int");
    }
    model_ = seq_layout(E.shape(0), E.shape(1), P.shape(0), h, ffn);
    visit_seq_dict(params, "params", blocks.size(), [&](std::size_t i, const std::string& name, py::handle obj) {
      const auto shape = model_.shape(i);
      py::array a = checked<float>(obj, name, shape.second ? 2 : 1, trainable);
      require_seq_shape(a, name, shape);
      model_.arrays[i] = static_cast<float*>(const_cast<void*>(a.data()));
      keep_.push_back(a);
    });
    read_item_features(params, trainable);
    validate(model_);
  }

  index_t dim() const { return model_.dim; }
  index_t max_len() const { return model_.max_len; }
  const std::string& precision() const { return precision_; }

  py::array_t<float> forward(py::handle seqs_obj, bool last_only, int n_threads, const std::string& isa) const {
    const auto [ps, B] = checked_seqs(seqs_obj, "seqs");
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    const index_t d = model_.dim, L = model_.max_len;
    py::array_t<float> out = last_only ? py::array_t<float>({B, d}) : py::array_t<float>({B, L, d});
    float* po = out.mutable_data();
    {
      const CoreCall call;
      const Scratch scratch(*this);
      if (B > 0) seq_forward(ks, model_, ps, B, last_only, po, n_threads, scratch.get());
    }
    return out;
  }

  // negatives None: the sampled softmax over the batch's distinct targets, corrected by log_q (float32
  // (n_items,) or None), as reference.sequential_loss_and_gradients.
  py::tuple loss_and_gradients(py::handle seqs_obj, py::handle targets_obj, py::handle negatives_obj, double dropout,
                               std::uint64_t stream, int n_threads, const std::string& isa, py::handle log_q_obj) const {
    const auto [ps, B] = checked_seqs(seqs_obj, "seqs");
    const auto [pt, Bt] = checked_seqs(targets_obj, "targets");
    const index_t L = model_.max_len;
    if (Bt != B) throw py::value_error("targets must have the shape of seqs");
    index_t K = 0;
    const std::int32_t* pn = nullptr;
    static const std::int32_t no_negatives = 0;
    if (!negatives_obj.is_none()) {
      py::array negatives = checked<std::int32_t>(negatives_obj, "negatives", 3, false);
      if (negatives.shape(0) != B || negatives.shape(1) != L)
        throw py::value_error("negatives must have shape (B, L, K) for seqs (B, L), got " + shape_str(negatives));
      K = negatives.shape(2);
      pn = negatives.size() ? static_cast<const std::int32_t*>(negatives.data()) : &no_negatives;
      for (index_t i = 0; i < B * L; ++i) {
        if (pt[i] < 0) continue;
        for (index_t j = 0; j < K; ++j)
          if (pn[i * K + j] < 0 || pn[i * K + j] >= model_.n_items)
            throw py::value_error("negatives must hold item rows in [0, " + std::to_string(model_.n_items) +
                                  ") at every position with a target");
      }
    }
    const float* log_q = checked_item_floats(log_q_obj, "log_q", false);
    check_dropout(dropout);
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    const SeqPrecision prec = seq_precision(isa);
    std::vector<float*> grads(model_.n_arrays());
    std::vector<py::array_t<float>> arrays;
    for (std::size_t i = 0; i < model_.n_arrays(); ++i) {
      const auto shape = model_.shape(i);
      arrays.push_back(shape.second ? py::array_t<float>({shape.first, shape.second}) : py::array_t<float>(shape.first));
      grads[i] = arrays.back().mutable_data();
    }
    py::array_t<float> feature_grad;
    if (model_.features.on()) feature_grad = py::array_t<float>({model_.features.n_features, model_.dim});
    double loss;
    {
      const CoreCall call;
      loss = seq_loss_and_gradients(ks, model_, ps, pt, pn, B, K, dropout, stream, grads, n_threads, log_q,
                                    model_.features.on() ? feature_grad.mutable_data() : nullptr, prec);
    }
    py::dict out;
    out["item_table"] = arrays[0];
    out["position_table"] = arrays[1];
    py::list blocks;
    for (int b = 0; b < model_.n_blocks(); ++b) {
      py::dict blk;
      for (int k = 0; k < kSeqBlockArrays; ++k) blk[kSeqBlockKeys[k]] = arrays[SeqModel::block_index(b, k)];
      blocks.append(blk);
    }
    out["blocks"] = blocks;
    out["final_gamma"] = arrays[model_.n_arrays() - 2];
    out["final_beta"] = arrays[model_.n_arrays() - 1];
    if (model_.features.on()) out["feature_table"] = feature_grad;
    return py::make_tuple(loss, out);
  }

  // The batches train_epoch would build (a test hook): [(seqs, targets, negatives, dropout_stream)].
  py::list epoch_batches(py::handle indptr_obj, py::handle items_obj, py::handle order_obj, index_t batch_size,
                         py::handle training_obj, std::uint64_t epoch) const {
    const SeqHistories h = checked_histories(indptr_obj, items_obj);
    const auto [po, n_order] = checked_order(order_obj, h.users, batch_size);
    const SeqTraining t = make_seq_training(training_obj, po, n_order);
    const index_t L = model_.max_len, K = t.negatives;
    py::list out;
    std::uint64_t batch_index = 0;
    for (index_t begin = 0; begin < n_order; begin += batch_size, ++batch_index) {
      const index_t n = std::min(batch_size, n_order - begin);
      py::array_t<std::int32_t> seqs({n, L}), targets({n, L}), negatives({n, L, K});
      std::uint64_t stream = 0;
      seq_batch(model_, h, t, po + begin, n, epoch, batch_index, seqs.mutable_data(), targets.mutable_data(),
                negatives.mutable_data(), &stream);
      out.append(py::make_tuple(seqs, targets, negatives, stream));
    }
    return out;
  }

  py::tuple train_epoch(py::handle state1, py::handle state2, py::handle indptr_obj, py::handle items_obj,
                        py::handle order_obj, index_t batch_size, py::handle training_obj, double dropout,
                        const std::string& solver, float learning_rate, float beta_1, float beta_2, float epsilon,
                        std::int64_t adam_t, std::uint64_t epoch, int n_threads, const std::string& isa,
                        py::handle progress) {
    if (!trainable_) throw py::value_error("this sequential model was built for prediction only (trainable=False)");
    const SeqHistories h = checked_histories(indptr_obj, items_obj);
    const auto [po, n_order] = checked_order(order_obj, h.users, batch_size);
    const SeqTraining t = make_seq_training(training_obj, po, n_order);
    check_dropout(dropout);
    Optimizer opt;
    if (solver == "adam") opt.solver = Solver::Adam;
    else if (solver == "sgd") opt.solver = Solver::Sgd;
    else throw py::value_error("solver must be 'sgd' or 'adam', got '" + solver + "'");
    if (!(learning_rate > 0.0f) || !std::isfinite(learning_rate))
      throw py::value_error("learning_rate must be a positive number");
    opt.learning_rate = learning_rate;
    opt.beta_1 = beta_1;
    opt.beta_2 = beta_2;
    opt.epsilon = epsilon;
    opt.adam_t = adam_t;
    float* feature_state[2] = {nullptr, nullptr};
    if (opt.solver == Solver::Adam) {  // sgd keeps no state: its state dicts are not read
      opt.state1 = state_arrays(state1, "state1");
      opt.state2 = state_arrays(state2, "state2");
      if (model_.features.on()) {
        feature_state[0] = feature_state_array(state1, "state1");
        feature_state[1] = feature_state_array(state2, "state2");
      }
    }
    const KernelSet& ks = kernels_for(resolve_isa(isa));
    const SeqPrecision prec = seq_precision(isa);
    PythonSignals signals(progress);
    EpochResult result;
    {
      const CoreCall call;
      const Scratch scratch(*this);
      result = seq_train_epoch(ks, model_, t, opt, h, po, n_order, batch_size, dropout, epoch, std::ref(signals),
                               n_threads, scratch.get(), feature_state[0], feature_state[1], prec);
    }
    return epoch_tuple(result, opt.adam_t, signals);
  }

 private:
  // The dense products' precision for a call under `isa` (bf16: the kernel as resolve_bf16_kernel).
  SeqPrecision seq_precision(const std::string& isa) const {
    if (precision_ != "bf16") return SeqPrecision::Float32;
    return resolve_bf16_kernel(bf16_kernel_, resolve_isa(isa)) ? SeqPrecision::Bf16Native : SeqPrecision::Bf16Emulated;
  }

  // The handle's scratch buffers while this call holds them; none (the call allocates its own) when another
  // call on the same handle is running.
  class Scratch {
   public:
    explicit Scratch(const SequentialHandle& h) : lock_(h.scratch_mutex_, std::try_to_lock) {
      if (!lock_.owns_lock()) return;
      if (!h.scratch_) h.scratch_ = std::make_unique<SeqScratch>(h.model_);
      scratch_ = h.scratch_.get();
    }
    SeqScratch* get() const { return scratch_; }

   private:
    std::unique_lock<std::mutex> lock_;
    SeqScratch* scratch_ = nullptr;
  };

  // int32 (B, max_len) item rows in [-1, n_items).
  std::pair<const std::int32_t*, index_t> checked_seqs(py::handle obj, const std::string& what) const {
    py::array a = checked<std::int32_t>(obj, what, 2, false);
    if (a.shape(1) != model_.max_len)
      throw py::value_error(what + " must have max_len = " + std::to_string(model_.max_len) + " columns, got shape " +
                            shape_str(a));
    const auto* p = static_cast<const std::int32_t*>(a.data());
    for (index_t i = 0; i < a.size(); ++i)
      if (p[i] < -1 || p[i] >= model_.n_items)
        throw py::value_error(what + " must hold item rows in [0, " + std::to_string(model_.n_items) +
                              ") or -1, got " + std::to_string(p[i]));
    return {p, a.shape(0)};
  }

  // Optional float32 (n_items,) finite values (probabilities in [0, 1] when `probabilities`).
  const float* checked_item_floats(py::handle obj, const std::string& what, bool probabilities) const {
    if (obj.is_none()) return nullptr;
    const float* p = optional_array<float>(obj, what, model_.n_items, false);
    for (index_t i = 0; i < model_.n_items; ++i)
      if (!std::isfinite(p[i]) || (probabilities && !(p[i] >= 0.0f && p[i] <= 1.0f)))
        throw py::value_error(what + (probabilities ? " must hold probabilities in [0, 1]" : " must be finite"));
    return p;
  }

  static void check_dropout(double dropout) {
    if (!(dropout >= 0.0 && dropout < 1.0)) throw py::value_error("dropout must be in [0, 1)");
  }

  SeqHistories checked_histories(py::handle indptr_obj, py::handle items_obj) const {
    py::array indptr = checked<std::int64_t>(indptr_obj, "indptr", 1, false);
    py::array items = checked<std::int32_t>(items_obj, "items", 1, false);
    SeqHistories h;
    h.indptr = static_cast<const std::int64_t*>(indptr.data());
    h.items = static_cast<const std::int32_t*>(items.data());
    h.users = indptr.shape(0) - 1;
    if (h.users < 0 || h.indptr[0] != 0 || h.indptr[h.users] != items.shape(0))
      throw py::value_error("histories must be (indptr, items) with indptr[0] == 0 and indptr[-1] == len(items)");
    for (index_t u = 0; u < h.users; ++u)
      if (h.indptr[u + 1] < h.indptr[u]) throw py::value_error("indptr must be non-decreasing");
    for (index_t i = 0; i < items.shape(0); ++i)
      if (h.items[i] < 0 || h.items[i] >= model_.n_items)
        throw py::value_error("items must hold item rows in [0, " + std::to_string(model_.n_items) + ")");
    return h;
  }

  // {"negatives": int >= 0, "n_items": int in [1, item rows], "seed": int, "seen": optional (indptr, indices)
  // with a row for every user of order}.
  SeqTraining make_seq_training(py::handle obj, const std::int64_t* order, index_t n_order) const {
    if (!py::isinstance<py::dict>(obj)) throw py::value_error("training must be a dict");
    const py::dict d = obj.cast<py::dict>();
    SeqTraining t;
    t.negatives = dict_item(d, "negatives", "training").cast<int>();
    if (t.negatives < 0) throw py::value_error("negatives must be >= 0");
    const std::string loss = d.contains("loss") ? d["loss"].cast<std::string>() : "bce";
    if (loss != "bce" && loss != "softmax")
      throw py::value_error("training['loss'] must be 'bce' or 'softmax', got '" + loss + "'");
    t.softmax = loss == "softmax";
    if (t.softmax) t.negatives = 0;  // the batch's other targets are the negatives: none drawn
    if (d.contains("item_prob")) t.item_prob = checked_item_floats(d["item_prob"], "item_prob", true);
    py::dict sampler;
    sampler["negatives"] = t.negatives;
    sampler["user_key"] = 0;
    sampler["item_key"] = 1;
    sampler["n_items"] = dict_item(d, "n_items", "training");
    sampler["seed"] = dict_item(d, "seed", "training");
    if (d.contains("seen")) sampler["seen"] = d["seen"];
    t.sampler = make_sampler(sampler);
    if (t.sampler.n_items > model_.n_items)
      throw py::value_error("training['n_items'] must be at most the item table's " + std::to_string(model_.n_items) +
                            " rows");
    if (t.sampler.seen_indptr)
      for (index_t i = 0; i < n_order; ++i)
        if (order[i] >= t.sampler.seen_users) throw py::value_error("seen has fewer rows than the users of order");
    return t;
  }

  std::vector<float*> state_arrays(py::handle obj, const std::string& what) const {
    if (!py::isinstance<py::dict>(obj)) throw py::value_error(what + " must be a dict shaped like params for 'adam'");
    std::vector<float*> out(model_.n_arrays(), nullptr);
    visit_seq_dict(obj.cast<py::dict>(), what, static_cast<std::size_t>(model_.n_blocks()),
                   [&](std::size_t i, const std::string& name, py::handle a_obj) {
                     const auto shape = model_.shape(i);
                     py::array a = checked<float>(a_obj, name, shape.second ? 2 : 1, true);
                     require_seq_shape(a, name, shape);
                     out[i] = static_cast<float*>(a.mutable_data());
                     for (std::size_t j = 0; j < model_.n_arrays(); ++j)
                       if (overlap(out[i], model_.size(i), model_.arrays[j], model_.size(j)))
                         throw py::value_error(name + " shares memory with a parameter array");
                   });
    return out;
  }

  // Item side features (sequential.h, SeqItemFeatures): params["feature_table"] (n_features, d) float32 and
  // params["item_features"] = (indptr int64 (n_items + 1,), ids int32, weights float32, id_trained uint8
  // (n_items,) or None); both keys or neither.
  void read_item_features(const py::dict& params, bool trainable) {
    const bool table = params.contains("feature_table"), csr = params.contains("item_features");
    if (table != csr) throw py::value_error("params needs both 'feature_table' and 'item_features', or neither");
    if (!table) return;
    py::array F = checked<float>(params["feature_table"], "params['feature_table']", 2, trainable);
    if (F.shape(1) != model_.dim)
      throw py::value_error("params['feature_table'] must have " + std::to_string(model_.dim) + " columns, got shape " +
                            shape_str(F));
    py::handle t_obj = params["item_features"];
    if (!py::isinstance<py::tuple>(t_obj) || py::len(t_obj) != 4)
      throw py::value_error("params['item_features'] must be a tuple (indptr, ids, weights, id_trained)");
    const py::tuple t = py::reinterpret_borrow<py::tuple>(t_obj);
    py::array indptr = checked<std::int64_t>(t[0], "item_features indptr", 1, false);
    py::array ids = checked<std::int32_t>(t[1], "item_features ids", 1, false);
    py::array weights = checked<float>(t[2], "item_features weights", 1, false);
    if (indptr.shape(0) != model_.n_items + 1)
      throw py::value_error("item_features indptr must have n_items + 1 = " + std::to_string(model_.n_items + 1) +
                            " entries, got " + shape_str(indptr));
    const auto* pi = static_cast<const std::int64_t*>(indptr.data());
    if (pi[model_.n_items] != ids.shape(0) || ids.shape(0) != weights.shape(0))
      throw py::value_error("item_features ids and weights must hold indptr[-1] entries each");
    SeqItemFeatures& f = model_.features;
    f.n_features = F.shape(0);
    f.table = static_cast<float*>(const_cast<void*>(F.data()));
    f.indptr = pi;
    f.ids = static_cast<const std::int32_t*>(ids.data());
    f.weights = static_cast<const float*>(weights.data());
    if (!t[3].is_none()) {
      py::array trained = checked<std::uint8_t>(t[3], "item_features id_trained", 1, false);
      if (trained.shape(0) != model_.n_items)
        throw py::value_error("item_features id_trained must have n_items = " + std::to_string(model_.n_items) +
                              " entries, got " + shape_str(trained));
      f.id_trained = static_cast<const std::uint8_t*>(trained.data());
      keep_.push_back(trained);
    }
    for (std::size_t j = 0; j < model_.n_arrays(); ++j)
      if (overlap(f.table, f.n_features * model_.dim, model_.arrays[j], model_.size(j)))
        throw py::value_error("params['feature_table'] shares memory with another parameter array");
    keep_.push_back(F);
    keep_.push_back(indptr);
    keep_.push_back(ids);
    keep_.push_back(weights);
  }

  // state["feature_table"]: Adam's state of the feature table.
  float* feature_state_array(py::handle obj, const std::string& what) const {
    const py::dict d = obj.cast<py::dict>();
    const std::string name = what + "['feature_table']";
    py::array a = checked<float>(dict_item(d, "feature_table", what), name, 2, true);
    require_seq_shape(a, name, {model_.features.n_features, model_.dim});
    float* p = static_cast<float*>(a.mutable_data());
    if (overlap(p, model_.features.n_features * model_.dim, model_.features.table,
                model_.features.n_features * model_.dim))
      throw py::value_error(name + " shares memory with a parameter array");
    return p;
  }

  SeqModel model_;
  bool trainable_;
  std::string precision_, bf16_kernel_;
  std::vector<py::object> keep_;
  mutable std::mutex scratch_mutex_;
  mutable std::unique_ptr<SeqScratch> scratch_;
};

py::dict show_config() {
  py::dict d;
  d["version"] = FASTREC_VERSION;
  d["openmp"] = openmp_enabled();
  d["max_threads"] = resolve_threads(0);  // what n_threads=None runs on now (1 in a forked child)
  std::vector<std::string> compiled, available;
  for (Isa i : compiled_isas()) compiled.push_back(isa_name(i));
  for (Isa i : available_isas()) available.push_back(isa_name(i));
  d["compiled_isas"] = compiled;
  d["available_isas"] = available;
  d["active_isa"] = isa_name(best_isa());
  const char* env = std::getenv("FASTREC_ISA");
  d["FASTREC_ISA"] = env ? py::object(py::str(env)) : py::object(py::none());
  d["bf16_kernels"] = bf16_kernels();  // bfloat16 products: "emulated" everywhere, "avx512_bf16" when usable
  d["bf16_kernel"] = bf16_native_available() ? "avx512_bf16" : "emulated";
#if defined(__clang__)
  d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "gcc " __VERSION__;
#endif
  return d;
}

// ---- exact inner-product top-k (topk.h) ----

// (items int32 [n_queries, k], scores float32 [n_queries, k]); every argument checked so the core reads
// nothing out of range.
py::tuple inner_product_topk_py(py::handle queries_obj, py::handle items_obj, index_t k, py::handle candidates_obj,
                                py::handle exclude_obj, py::handle exclude_rows_obj, int n_threads,
                                const std::string& isa) {
  py::array queries = checked<float>(queries_obj, "queries", 2, false);
  py::array items = checked<float>(items_obj, "items", 2, false);
  const index_t n_queries = queries.shape(0), dim = queries.shape(1), n_items = items.shape(0);
  if (items.shape(1) != dim)
    throw py::value_error("items must have " + std::to_string(dim) + " columns (as queries), got shape " +
                          shape_str(items));
  if (n_items > INT32_MAX) throw py::value_error("items must have fewer than 2^31 rows, got " + std::to_string(n_items));
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  const std::int32_t* pc = nullptr;
  index_t n_candidates = 0;
  if (!candidates_obj.is_none()) {
    py::array c = checked<std::int32_t>(candidates_obj, "candidates", 1, false);
    pc = static_cast<const std::int32_t*>(c.data());
    n_candidates = c.shape(0);
    for (index_t i = 0; i < n_candidates; ++i)
      if (pc[i] < 0 || pc[i] >= n_items)
        throw py::value_error("candidates must lie in [0, " + std::to_string(n_items) + "), got " +
                              std::to_string(pc[i]) + " at position " + std::to_string(i));
  }
  const std::int64_t* excl_indptr = nullptr;
  const std::int32_t* excl_items = nullptr;
  const std::int32_t* excl_rows = nullptr;
  if (!exclude_obj.is_none()) {
    if (!(py::isinstance<py::tuple>(exclude_obj) || py::isinstance<py::list>(exclude_obj)) || py::len(exclude_obj) != 2)
      throw py::value_error("exclude must be None or a pair (indptr int64, items int32)");
    const py::sequence pair = py::reinterpret_borrow<py::sequence>(exclude_obj);
    py::array indptr = checked<std::int64_t>(pair[0], "exclude.indptr", 1, false);
    py::array ex = checked<std::int32_t>(pair[1], "exclude.items", 1, false);
    excl_indptr = static_cast<const std::int64_t*>(indptr.data());
    excl_items = static_cast<const std::int32_t*>(ex.data());
    const index_t rows = indptr.shape(0) - 1, n_ex = ex.shape(0);
    if (rows < 0 || excl_indptr[0] != 0 || excl_indptr[rows] != n_ex)
      throw py::value_error("exclude.indptr must start at 0 and end at len(exclude.items) = " + std::to_string(n_ex));
    for (index_t r = 0; r < rows; ++r) {
      if (excl_indptr[r + 1] < excl_indptr[r]) throw py::value_error("exclude.indptr must be non-decreasing");
      for (std::int64_t e = excl_indptr[r]; e < excl_indptr[r + 1]; ++e) {
        if (excl_items[e] < 0 || excl_items[e] >= n_items)
          throw py::value_error("exclude.items must lie in [0, " + std::to_string(n_items) + "), got " +
                                std::to_string(excl_items[e]) + " in row " + std::to_string(r));
        if (e > excl_indptr[r] && excl_items[e] < excl_items[e - 1])
          throw py::value_error("exclude.items must be sorted within each row (row " + std::to_string(r) + " is not)");
      }
    }
    if (!exclude_rows_obj.is_none()) {
      py::array er = checked<std::int32_t>(exclude_rows_obj, "exclude_rows", 1, false);
      require_shape(er, "exclude_rows", n_queries, 0);
      excl_rows = static_cast<const std::int32_t*>(er.data());
      for (index_t q = 0; q < n_queries; ++q)
        if (excl_rows[q] < 0 || excl_rows[q] >= rows)
          throw py::value_error("exclude_rows must lie in [0, " + std::to_string(rows) + ") (rows of exclude), got " +
                                std::to_string(excl_rows[q]) + " for query " + std::to_string(q));
    } else if (rows != n_queries) {
      throw py::value_error("exclude has " + std::to_string(rows) + " rows but queries has " +
                            std::to_string(n_queries) + "; pass exclude_rows to map queries to rows");
    }
  } else if (!exclude_rows_obj.is_none()) {
    throw py::value_error("exclude_rows needs exclude");
  }
  const KernelSet& ks = kernels_for(resolve_isa(isa));
  py::array_t<std::int32_t> out_items({n_queries, k});
  py::array_t<float> out_scores({n_queries, k});
  std::int32_t* pi = out_items.mutable_data();
  float* ps = out_scores.mutable_data();
  const auto* pq = static_cast<const float*>(queries.data());
  const auto* pit = static_cast<const float*>(items.data());
  {
    const CoreCall call;
    inner_product_topk(ks, pq, n_queries, dim, pit, n_items, dim, dim, pc, n_candidates, excl_indptr, excl_items,
                       excl_rows, k, pi, ps, n_threads);
  }
  return py::make_tuple(out_items, out_scores);
}


// ---- AutoRec (cpp/autorec.h): params = [W_enc (n_cols, hidden), b_enc (hidden,), W_dec (n_cols, hidden),
// b_dec (n_cols,)], caller-owned float32; X = (indptr int64, indices int32, data float32, n_cols) ----

AutoRecModel make_autorec(const py::list& params, const std::string& activation, bool writeable) {
  if (params.size() != 4) throw py::value_error("params must be [W_enc, b_enc, W_dec, b_dec]");
  static const char* names[] = {"W_enc", "b_enc", "W_dec", "b_dec"};
  py::array a[4];
  for (int i = 0; i < 4; ++i) a[i] = checked<float>(params[i], std::string("params.") + names[i], i % 2 ? 1 : 2, writeable);
  AutoRecModel m;
  m.n_cols = a[0].shape(0);
  m.hidden = a[0].shape(1);
  if (m.hidden < 1) throw py::value_error("params.W_enc must have at least one column (hidden units)");
  if (m.n_cols >= INT32_MAX) throw py::value_error("params.W_enc must have fewer than 2^31 - 1 rows");
  require_shape(a[1], "params.b_enc", m.hidden, 1);
  require_shape(a[2], "params.W_dec", m.n_cols, m.hidden);
  require_shape(a[3], "params.b_dec", m.n_cols, 1);
  m.act = parse_activation(activation);
  if (m.act == Activation::Softmax) throw py::value_error("activation cannot be 'softmax'");
  float* p[4];
  for (int i = 0; i < 4; ++i) p[i] = static_cast<float*>(const_cast<void*>(a[i].data()));
  m.W_enc = p[0], m.b_enc = p[1], m.W_dec = p[2], m.b_dec = p[3];
  if (writeable)
    for (int i = 0; i < 4; ++i)
      for (int j = i + 1; j < 4; ++j)
        if (overlap(p[i], a[i].size(), p[j], a[j].size()))
          throw py::value_error(std::string("params.") + names[i] + " and params." + names[j] + " share memory");
  return m;
}

// Targets: float32, one per entry of X, finite.
const float* autorec_targets(py::handle obj, const Input& X) {
  const float* t = flat_array<float>(obj, "t", X.csr.indptr[X.rows], false);
  for (index_t p = 0; p < X.csr.indptr[X.rows]; ++p)
    if (!std::isfinite(t[p]) || !std::isfinite(X.csr.data[p]))
      throw py::value_error("X.data and t must be finite");
  return t;
}

Input autorec_input(py::handle X, const AutoRecModel& m) {
  if (!py::isinstance<py::tuple>(X)) throw py::type_error("X must be the CSR tuple (indptr, indices, data, n_cols)");
  return make_input(X, m.n_cols);
}

py::array_t<float> autorec_hidden_py(const py::list& params, py::handle X_obj, const std::string& activation,
                                     int n_threads, const std::string& isa) {
  const AutoRecModel m = make_autorec(params, activation, false);
  const Input X = autorec_input(X_obj, m);
  const KernelSet& ks = kernels_for(resolve_isa(isa));
  py::array_t<float> H({X.rows, m.hidden});
  float* ph = H.mutable_data();
  {
    const CoreCall call;
    autorec_hidden(ks, m, X.csr, ph, n_threads);
  }
  return H;
}

py::array_t<float> autorec_predict_py(const py::list& params, py::handle X_obj, py::handle q_indptr_obj,
                                      py::handle q_cols_obj, const std::string& activation, int n_threads,
                                      const std::string& isa) {
  const AutoRecModel m = make_autorec(params, activation, false);
  const Input X = autorec_input(X_obj, m);
  py::array qi = checked<std::int64_t>(q_indptr_obj, "q_indptr", 1, false);
  py::array qc = checked<std::int32_t>(q_cols_obj, "q_cols", 1, false);
  require_shape(qi, "q_indptr", X.rows + 1, 0);
  const auto* pqi = static_cast<const std::int64_t*>(qi.data());
  const auto* pqc = static_cast<const std::int32_t*>(qc.data());
  if (pqi[0] != 0 || pqi[X.rows] != qc.shape(0)) throw py::value_error("q_indptr must start at 0 and end at len(q_cols)");
  for (index_t r = 0; r < X.rows; ++r)
    if (pqi[r + 1] < pqi[r]) throw py::value_error("q_indptr must be non-decreasing");
  for (index_t q = 0; q < qc.shape(0); ++q)
    if (pqc[q] < 0 || pqc[q] >= m.n_cols)
      throw py::value_error("q_cols must lie in [0, " + std::to_string(m.n_cols) + ")");
  const KernelSet& ks = kernels_for(resolve_isa(isa));
  py::array_t<float> out(qc.shape(0));
  float* po = out.mutable_data();
  {
    const CoreCall call;
    autorec_predict(ks, m, X.csr, pqi, pqc, po, n_threads);
  }
  return out;
}

py::tuple autorec_loss_and_gradients_py(const py::list& params, py::handle X_obj, py::handle t_obj, float l2,
                                        const std::string& activation, int n_threads, const std::string& isa) {
  const AutoRecModel m = make_autorec(params, activation, false);
  const Input X = autorec_input(X_obj, m);
  if (X.rows < 1) throw py::value_error("X must have at least one row");
  const float* t = autorec_targets(t_obj, X);
  if (!(l2 >= 0.0f) || !std::isfinite(l2)) throw py::value_error("l2 must be a finite number >= 0");
  const KernelSet& ks = kernels_for(resolve_isa(isa));
  py::array_t<float> gWe({m.n_cols, m.hidden}), gbe(m.hidden), gWd({m.n_cols, m.hidden}), gbd(m.n_cols);
  float *p0 = gWe.mutable_data(), *p1 = gbe.mutable_data(), *p2 = gWd.mutable_data(), *p3 = gbd.mutable_data();
  double loss;
  {
    const CoreCall call;
    loss = autorec_loss_and_gradients(ks, m, X.csr, t, l2, p0, p1, p2, p3, n_threads);
  }
  py::list grads;
  grads.append(gWe), grads.append(gbe), grads.append(gWd), grads.append(gbd);
  return py::make_tuple(loss, grads);
}

py::tuple autorec_train_epoch_py(const py::list& params, const py::list& state1, const py::list& state2,
                                 py::handle X_obj, py::handle t_obj, py::handle order_obj, index_t batch_size, float l2,
                                 const std::string& activation, const std::string& solver, float learning_rate,
                                 float beta_1, float beta_2, float epsilon, std::int64_t adam_t, int n_threads,
                                 const std::string& isa, py::handle progress) {
  const AutoRecModel m = make_autorec(params, activation, true);
  const Input X = autorec_input(X_obj, m);
  const float* t = autorec_targets(t_obj, X);
  py::array order = checked<std::int64_t>(order_obj, "order", 1, false);
  const auto* po = static_cast<const std::int64_t*>(order.data());
  const index_t n_order = order.shape(0);
  for (index_t i = 0; i < n_order; ++i)
    if (po[i] < 0 || po[i] >= X.rows) throw py::value_error("order must hold rows of X in [0, " + std::to_string(X.rows) + ")");
  if (batch_size < 1) throw py::value_error("batch_size must be >= 1");
  if (!(l2 >= 0.0f) || !std::isfinite(l2)) throw py::value_error("l2 must be a finite number >= 0");
  if (!(learning_rate > 0.0f) || !std::isfinite(learning_rate)) throw py::value_error("learning_rate must be a positive number");
  Optimizer opt;
  if (solver == "adam") opt.solver = Solver::Adam;
  else if (solver == "sgd") opt.solver = Solver::Sgd;
  else throw py::value_error("solver must be 'sgd' or 'adam', got '" + solver + "'");
  opt.learning_rate = learning_rate;
  opt.beta_1 = beta_1;
  opt.beta_2 = beta_2;
  opt.epsilon = epsilon;
  opt.adam_t = adam_t;
  if (opt.solver == Solver::Adam) {  // sgd keeps no state
    const index_t sizes[4] = {m.n_cols * m.hidden, m.hidden, m.n_cols * m.hidden, m.n_cols};
    const float* owned[4] = {m.W_enc, m.b_enc, m.W_dec, m.b_dec};
    for (const py::list* states : {&state1, &state2}) {
      const std::string what = states == &state1 ? "state1" : "state2";
      if (states->size() != 4) throw py::value_error(what + " must hold 4 arrays (W_enc, b_enc, W_dec, b_dec)");
      std::vector<float*>& out = states == &state1 ? opt.state1 : opt.state2;
      for (int i = 0; i < 4; ++i) {
        float* p = flat_array<float>((*states)[i], what + "[" + std::to_string(i) + "]", sizes[i], true);
        for (int j = 0; j < 4; ++j)
          if (overlap(p, sizes[i], owned[j], sizes[j])) throw py::value_error(what + " shares memory with params");
        out.push_back(p);
      }
    }
  }
  const KernelSet& ks = kernels_for(resolve_isa(isa));
  PythonSignals signals(progress);
  EpochResult result;
  {
    const CoreCall call;
    result = autorec_train_epoch(ks, m, opt, X.csr, t, po, n_order, batch_size, l2, std::ref(signals), n_threads);
  }
  return epoch_tuple(result, opt.adam_t, signals);
}


// ---- Mult-VAE / Mult-DAE (multvae.h): layers as coefs / intercepts lists, encoder first ----

AutoencoderNet make_autoencoder(const py::list& coefs, const py::list& intercepts, std::size_t n_encoder,
                                bool variational, bool writeable) {
  if (coefs.size() != intercepts.size())
    throw py::value_error("coefs and intercepts must have the same length");
  AutoencoderNet net;
  net.n_encoder = n_encoder;
  net.variational = variational;
  for (std::size_t l = 0; l < coefs.size(); ++l) {
    const std::string name = "coefs[" + std::to_string(l) + "]";
    py::array W = checked<float>(coefs[l], name, 2, writeable);
    py::array b = checked<float>(intercepts[l], "intercepts[" + std::to_string(l) + "]", 1, writeable);
    require_shape(b, "intercepts[" + std::to_string(l) + "]", W.shape(1), 1);
    net.layers.push_back(Layer{const_cast<float*>(static_cast<const float*>(W.data())),
                               const_cast<float*>(static_cast<const float*>(b.data())), W.shape(0), W.shape(1)});
  }
  validate(net);  // std::invalid_argument -> ValueError
  if (writeable)
    for (std::size_t i = 0; i < 2 * net.layers.size(); ++i)
      for (std::size_t j = i + 1; j < 2 * net.layers.size(); ++j) {
        const Layer &a = net.layers[i / 2], &c = net.layers[j / 2];
        if (overlap(i % 2 ? a.b : a.W, i % 2 ? a.fan_out : a.fan_in * a.fan_out, j % 2 ? c.b : c.W,
                    j % 2 ? c.fan_out : c.fan_in * c.fan_out))
          throw py::value_error("coefs and intercepts share memory: each layer needs its own arrays");
      }
  return net;
}

// precision "float32" or "bf16" (the output layer's training products; bf16_kernel as resolve_bf16_kernel).
void set_precision(AutoencoderNet& net, const std::string& precision, const std::string& bf16_kernel,
                   const std::string& isa) {
  if (precision != "float32" && precision != "bf16")
    throw py::value_error("precision must be 'float32' or 'bf16', got '" + precision + "'");
  net.bf16_output = precision == "bf16";
  net.bf16_native = net.bf16_output && resolve_bf16_kernel(bf16_kernel, resolve_isa(isa));
}

CsrView autoencoder_input(py::handle X, const AutoencoderNet& net) {
  if (!py::isinstance<py::tuple>(X)) throw py::type_error("X must be a CSR tuple (indptr, indices, data, n_cols)");
  return make_input(X, net.n_items()).csr;
}

// The Adam moments of every array (W_0..W_{L-1}, b_0..b_{L-1}), shapes checked.
std::vector<float*> autoencoder_states(const py::list& states, const std::string& what, const AutoencoderNet& net) {
  const std::size_t L = net.layers.size();
  if (states.size() != 2 * L)
    throw py::value_error(what + " must hold " + std::to_string(2 * L) + " arrays (every W, then every b)");
  std::vector<float*> out;
  for (std::size_t i = 0; i < states.size(); ++i) {
    const Layer& layer = net.layers[i % L];
    const bool is_coef = i < L;
    const std::string name = what + "[" + std::to_string(i) + "]";
    py::array a = checked<float>(states[i], name, is_coef ? 2 : 1, true);
    require_shape(a, name, is_coef ? layer.fan_in : layer.fan_out, layer.fan_out);
    out.push_back(static_cast<float*>(a.mutable_data()));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastrec's C++ core (private: use the fastrec package).";
  m.attr("__version__") = FASTREC_VERSION;
  in_forked_child();  // registers the fork handler (parallel.h) before anything here can start a thread
  m.def(
      "hash_buckets",
      [](const py::array& values, std::int64_t buckets, int n_threads) {
        const char kind = values.dtype().kind();
        require(values.ndim() == 1, "values must be 1-D");
        require(values.flags() & py::array::c_style, "values must be C-contiguous");
        require(values.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_, "values must be aligned");
        require(kind == 'U' || (kind == 'i' && values.itemsize() == 8), "values must be int64 or str (<U) ids");
        const index_t n = values.shape(0);
        py::array_t<std::int32_t> out(n);
        std::int32_t* dst = out.mutable_data();
        const void* src = values.data();
        const index_t width = values.itemsize() / 4;
        {
          CoreCall call;
          if (kind == 'U')
            hash_ucs4(static_cast<const std::uint32_t*>(src), n, width, buckets, dst, n_threads);
          else
            hash_int64(static_cast<const std::int64_t*>(src), n, buckets, dst, n_threads);
        }
        return out;
      },
      py::arg("values"), py::arg("buckets"), py::arg("n_threads") = 0,
      "Bucket 1..buckets of each int64 or str id: CRC-32 of its text (decimal for ints, UTF-8 for strings) "
      "modulo buckets, plus 1.");
  m.def(
      "unique_ids",
      [](const py::array_t<std::int64_t, py::array::c_style>& values) {
        require(values.ndim() == 1, "values must be 1-D");
        require(values.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_, "values must be aligned");
        const index_t n = values.shape(0);
        py::array_t<std::int32_t> codes(n);
        std::vector<std::int64_t> unique;
        {
          CoreCall call;
          unique_int64(values.data(), n, unique, codes.mutable_data());
        }
        py::array_t<std::int64_t> ids(static_cast<py::ssize_t>(unique.size()));
        std::copy(unique.begin(), unique.end(), ids.mutable_data());
        return py::make_tuple(ids, codes);
      },
      py::arg("values"),
      "(sorted distinct int64 values, int32 code of each value: its position among them + 1).");
  m.def(
      "fill_normal",
      [](py::array& out, std::uint64_t seed, std::int64_t first, float loc, float scale, int n_threads,
         const std::string& isa) {
        require(first >= 0, "first must be non-negative");
        require(out.dtype().is(py::dtype::of<float>()), "out must be float32");
        require(out.flags() & py::array::c_style, "out must be C-contiguous");
        require(out.writeable(), "out must be writeable");
        float* dst = static_cast<float*>(out.mutable_data());
        const index_t n = out.size();
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        CoreCall call;
        fill_normal(ks, seed, first, n, loc, scale, dst, n_threads);
      },
      py::arg("out"), py::arg("seed"), py::arg("first") = 0, py::arg("loc") = 0.0f, py::arg("scale") = 1.0f,
      py::arg("n_threads") = 0, py::arg("isa") = "auto",
      "Fill float32 `out` (flat index i) with loc + scale * z(seed, first + i), z approximately standard normal "
      "(four 16-bit uniforms summed, unit variance, support +-3.46): the same numbers for any thread count.");
  m.def(
      "standardize",
      [](const py::array& values, const py::object& mean_in, const py::object& std_in, int n_threads,
         const std::string& isa) {
        const char kind = values.dtype().kind();
        require(kind == 'f' && (values.itemsize() == 4 || values.itemsize() == 8), "values must be float32 or float64");
        require(values.ndim() == 2, "values must be 2-D");
        require(values.flags() & py::array::c_style, "values must be C-contiguous");
        require(values.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_, "values must be aligned");
        const index_t n = values.shape(0), c = values.shape(1);
        const bool fit = mean_in.is_none();
        py::array_t<double> mean(c), std(c);
        if (!fit) {
          auto m_ = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(mean_in);
          auto s_ = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(std_in);
          require(m_ && s_ && m_.size() == c && s_.size() == c, "mean and std must have one value per column");
          std::copy(m_.data(), m_.data() + c, mean.mutable_data());
          std::copy(s_.data(), s_.data() + c, std.mutable_data());
        }
        py::array_t<float> out({n, c});
        // Every pointer and the dtype read while the GIL is held (dtype() creates a Python object).
        const bool single = values.itemsize() == 4;
        const void* src = values.data();
        double* mean_p = mean.mutable_data();
        double* std_p = std.mutable_data();
        float* out_p = out.mutable_data();
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        int status;
        {
          CoreCall call;
          status = single
                       ? standardize(ks, static_cast<const float*>(src), n, c, fit, mean_p, std_p, out_p, n_threads)
                       : standardize(ks, static_cast<const double*>(src), n, c, fit, mean_p, std_p, out_p, n_threads);
        }
        return py::make_tuple(out, mean, std, status);
      },
      py::arg("values"), py::arg("mean") = py::none(), py::arg("std") = py::none(), py::arg("n_threads") = 0,
      py::arg("isa") = "auto",
      "(float32 (v - mean) / std, mean, std, status) of an n x c float array; mean / std (population, 1 where "
      "0) computed when not given; status 0 ok, 1 a value not finite or beyond float32, 2 a standardised value "
      "beyond float32.");
  m.def(
      "bag_weights",
      [](const py::array_t<std::int64_t, py::array::c_style>& indptr, const py::array& data, bool mean,
         int n_threads) {
        const char kind = data.dtype().kind();
        require(kind == 'f' && (data.itemsize() == 4 || data.itemsize() == 8), "data must be float32 or float64");
        require(data.ndim() == 1 && (data.flags() & py::array::c_style), "data must be 1-D and C-contiguous");
        require(data.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_, "data must be aligned");
        require(indptr.ndim() == 1 && indptr.size() >= 1, "indptr must be 1-D with at least one entry");
        const index_t rows = indptr.size() - 1;
        const std::int64_t* ptr = indptr.data();
        require(ptr[0] == 0 && ptr[rows] == data.size(), "indptr must run from 0 to len(data)");
        for (index_t r = 0; r < rows; ++r) require(ptr[r] <= ptr[r + 1], "indptr must be non-decreasing");
        py::array_t<float> out(data.size());
        const bool single = data.itemsize() == 4;
        const void* src = data.data();
        float* out_p = out.mutable_data();
        int status;
        {
          CoreCall call;
          status = single ? bag_weights(ptr, rows, static_cast<const float*>(src), mean, out_p, n_threads)
                          : bag_weights(ptr, rows, static_cast<const double*>(src), mean, out_p, n_threads);
        }
        return py::make_tuple(out, status);
      },
      py::arg("indptr"), py::arg("data"), py::arg("mean"), py::arg("n_threads") = 0,
      "(float32 weights, status) of a CSR matrix's values: each row's weights divided by their float64 sum "
      "when mean (0 for a zero-sum row); status 0 ok, 1 a value not finite or beyond float32.");
  m.def("show_config", &show_config, "Build and run-time configuration as a dict.");
  // The busy-machine thread choice (parallel.h, ThreadChoice) replayed on given batch times, for tests.
  m.def(
      "_thread_choice_trace",
      [](const std::vector<double>& one, const std::vector<double>& all, int threads, int resume) {
        require(one.size() == all.size() && threads >= 2, "one and all: equal lengths; threads >= 2");
        ThreadChoice choice(threads, true);
        if (resume > 0) choice.resume(resume);
        std::vector<int> used;
        for (std::size_t i = 0; i < one.size(); ++i) {
          const int t = choice.next();
          used.push_back(t);
          choice.done(t, t == 1 ? one[i] : all[i], 1);
        }
        return used;
      },
      py::arg("one"), py::arg("all"), py::arg("threads") = 2, py::arg("resume") = 0,
      "Thread counts the automatic choice gives batches i = 0, 1, ... that take one[i] seconds on one thread "
      "and all[i] on `threads` (resume > 0: started as a training loop after another chose `resume` threads).");
  m.def(
      "_last_training_choice",
      [] {
        const TrainingChoice& last = last_training_choice();
        return py::make_tuple(last.threads.load(), last.threads.load() == 0 ? -1.0 : last.age_seconds());
      },
      "(threads the last automatic training loop of this process chose (0: none), seconds since (-1: never)).");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa i : available_isas()) out.push_back(isa_name(i));
    return out;
  }, "SIMD paths compiled into this build and supported by this CPU, lowest first.");

  m.def(
      "sgemm",
      [](py::handle a_obj, py::handle b_obj, bool trans_a, bool trans_b, const std::string& isa, int n_threads) {
        const GemmOperands g = gemm_operands(a_obj, b_obj, trans_a, trans_b);
        const index_t M = g.M, N = g.N, K = g.K;
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        py::array_t<float> c({M, N});
        float* pc = c.mutable_data();
        {
          const CoreCall call;
          sgemm(ks, trans_a, trans_b, M, N, K, g.pa(), g.a.shape(1), g.pb(), g.b.shape(1), pc, N, nullptr, n_threads);
        }
        return c;
      },
      py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false, py::arg("isa") = "auto",
      py::arg("n_threads") = 0, "op(a) @ op(b) in float32 with fastrec's GEMM engine.");
  // ---- bfloat16 products (gemm.h bf16_gemm) ----
  m.def(
      "bf16_gemm",
      [](py::handle a_obj, py::handle b_obj, bool trans_a, bool trans_b, const std::string& kernel,
         const std::string& isa, int n_threads) {
        const GemmOperands g = gemm_operands(a_obj, b_obj, trans_a, trans_b);
        const index_t M = g.M, N = g.N, K = g.K;
        const Isa chosen = resolve_isa(isa);
        const bool native = resolve_bf16_kernel(kernel, chosen);
        const KernelSet& ks = kernels_for(chosen);
        py::array_t<float> c({M, N});
        float* pc = c.mutable_data();
        {
          const CoreCall call;
          bf16_gemm(ks, native, trans_a, trans_b, M, N, K, g.pa(), g.a.shape(1), g.pb(), g.b.shape(1), pc, N, nullptr,
                    n_threads);
        }
        return c;
      },
      py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
      py::arg("kernel") = "auto", py::arg("isa") = "auto", py::arg("n_threads") = 0,
      "op(a) @ op(b) with a and b rounded to bfloat16 and float32 sums. kernel: 'auto', 'avx512_bf16' or "
      "'emulated' (the float32 kernels of `isa` on the rounded operands).");
  // The sequential model's bf16 weight gradient (sequential.h seq_bf16_weight_gradient), for tests.
  m.def(
      "_seq_bf16_weight_gradient",
      [](py::handle x_obj, py::handle dy_obj, const std::string& kernel, int n_threads) {
        const GemmOperands g = gemm_operands(x_obj, dy_obj, true, false);
        const Isa chosen = resolve_isa("auto");
        const bool native = resolve_bf16_kernel(kernel, chosen);
        py::array_t<float> c({g.M, g.N}), sums(g.N);
        float* pc = c.mutable_data();
        float* ps = sums.mutable_data();
        {
          const CoreCall call;
          seq_bf16_weight_gradient(kernels_for(chosen), native, g.M, g.N, g.K, g.pa(), g.a.shape(1), g.pb(),
                                   g.b.shape(1), pc, g.N, ps, n_threads);
        }
        return py::make_tuple(c, sums);
      },
      py::arg("x"), py::arg("dy"), py::arg("kernel") = "auto", py::arg("n_threads") = 1,
      "(xᵀ @ dy with x and dy rounded to bfloat16 and float32 sums, dy's column sums) by the sequential model's "
      "weight-gradient path.");
  m.def("bf16_kernels", [] { return bf16_kernels(); },
        "The bf16 product kernels usable here: 'emulated', then 'avx512_bf16' when the CPU has it.");

  m.def(
      "forward",
      [](const py::list& coefs, const py::list& intercepts, py::handle X, const std::string& activation,
         const std::string& out_activation, int n_threads, const std::string& isa) {
        const Network net = make_network(coefs, intercepts, activation, out_activation, false);
        const Input in = make_input(X, net.layers[0].fan_in);
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        py::array_t<float> out({in.rows, net.layers.back().fan_out});
        float* po = out.mutable_data();
        {
          const CoreCall call;
          static SharedThreadChoice choice;  // each call a batch of the process's forward calls (parallel.h)
          const SharedThreadChoice::Batch batch(choice, n_threads, in.rows, 256);
          if (in.rows > 0) forward(ks, net, in, po, batch.threads());
        }
        return out;
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("X"), py::arg("activation"), py::arg("out_activation"),
      py::arg("n_threads") = 0, py::arg("isa") = "auto", "Network output after the output activation.");

  m.def(
      "loss_and_gradients",
      [](const py::list& coefs, const py::list& intercepts, py::handle X, py::handle Y, const std::string& activation,
         const std::string& out_activation, float alpha, int n_threads, const std::string& isa,
         py::handle sample_weight) {
        const Network net = make_network(coefs, intercepts, activation, out_activation, false);
        const Input in = make_input(X, net.layers[0].fan_in);
        if (in.rows < 1) throw py::value_error("X must have at least one row");
        const float* y = checked_targets(Y, net, in.rows);
        const float* w = checked_sample_weight(sample_weight, in.rows);
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        py::list coef_grads, intercept_grads;
        std::vector<float*> gw, gb;
        for (const Layer& layer : net.layers) {
          py::array_t<float> w({layer.fan_in, layer.fan_out}), b(layer.fan_out);
          gw.push_back(w.mutable_data());
          gb.push_back(b.mutable_data());
          coef_grads.append(w);
          intercept_grads.append(b);
        }
        double loss;
        {
          const CoreCall call;
          loss = loss_and_gradients(ks, net, in, y, w, alpha, gw, gb, n_threads);
        }
        return py::make_tuple(loss, coef_grads, intercept_grads);
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("X"), py::arg("Y"), py::arg("activation"),
      py::arg("out_activation"), py::arg("alpha"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
      py::arg("sample_weight") = py::none(),
      "Loss and gradients of the whole input as one batch (see docs/DESIGN.md).");

  m.def(
      "train_epoch",
      [](const py::list& coefs, const py::list& intercepts, const py::list& state1, const py::list& state2,
         py::handle X, py::handle Y, py::handle order_obj, index_t batch_size, const std::string& activation,
         const std::string& out_activation, float alpha, const std::string& solver, float learning_rate,
         float momentum, bool nesterov, float beta_1, float beta_2, float epsilon, std::int64_t adam_t,
         int n_threads, const std::string& isa, py::handle progress, py::handle sample_weight) {
        const Network net = make_network(coefs, intercepts, activation, out_activation, true);
        const Input in = make_input(X, net.layers[0].fan_in);
        const float* y = checked_targets(Y, net, in.rows);
        const float* w = checked_sample_weight(sample_weight, in.rows);
        const auto [po, n_order] = checked_order(order_obj, in.rows, batch_size);
        Optimizer opt = make_optimizer(solver, false, state1, state2, net, learning_rate, momentum, nesterov, beta_1,
                                       beta_2, epsilon, adam_t);
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        PythonSignals signals(progress);
        EpochResult result;
        {
          const CoreCall call;
          result = train_epoch(ks, net, opt, in, y, w, po, n_order, batch_size, alpha, std::ref(signals), n_threads);
        }
        return epoch_tuple(result, opt.adam_t, signals);
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("state1"), py::arg("state2"), py::arg("X"), py::arg("Y"),
      py::arg("order"), py::arg("batch_size"), py::arg("activation"), py::arg("out_activation"), py::arg("alpha"),
      py::arg("solver"), py::arg("learning_rate"), py::arg("momentum"), py::arg("nesterov"), py::arg("beta_1"),
      py::arg("beta_2"), py::arg("epsilon"), py::arg("adam_t"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
      py::arg("progress") = py::none(), py::arg("sample_weight") = py::none(),
      "One epoch of minibatch training, updating parameters and optimizer state in place. Returns (loss_sum, "
      "adam_t, rows, diverged, exception or None); see docs/DESIGN.md.");
  // ---- Differentially private training: the random streams (private.h), for tests and oracles ----
  m.def(
      "dp_normal",
      [](std::uint64_t seed, std::uint64_t step, std::uint64_t stream, py::array_t<std::uint64_t> index) {
        py::array_t<double> out(index.size());
        for (py::ssize_t k = 0; k < index.size(); ++k)
          out.mutable_data()[k] = normal_at(seed, step, stream, index.data()[k]);
        return out;
      },
      py::arg("seed"), py::arg("step"), py::arg("stream"), py::arg("index"),
      "The standard normal numbers of the private training noise stream (seed, step, stream) at `index`.");
  m.def(
      "dp_poisson_sample",
      [](std::uint64_t seed, std::uint64_t step, index_t n, double q) {
        if (n < 0 || !(q >= 0.0 && q <= 1.0)) throw py::value_error("need n >= 0 and q in [0, 1]");
        const std::vector<std::int64_t> rows = poisson_sample(seed, step, n, q);
        return py::array_t<std::int64_t>(static_cast<py::ssize_t>(rows.size()), rows.data());
      },
      py::arg("seed"), py::arg("step"), py::arg("n"), py::arg("q"),
      "The sorted example indices private step `step` trains on (each of n with probability q).");
  m.def(
      "dp_unit_sample",
      [](std::uint64_t seed, std::uint64_t step, double q, py::array_t<std::int64_t, py::array::c_style> indptr,
         py::array_t<std::int64_t, py::array::c_style> rows, index_t cap) {
        if (indptr.size() < 2 || !(q > 0.0 && q <= 1.0) || cap < 1 || indptr.data()[0] != 0 ||
            indptr.data()[indptr.size() - 1] != rows.size())
          throw py::value_error("need q in (0, 1], cap >= 1 and indptr from 0 to len(rows)");
        for (index_t u = 0; u + 1 < indptr.size(); ++u)
          if (indptr.data()[u + 1] < indptr.data()[u]) throw py::value_error("indptr must not decrease");
        PrivacySettings ps;
        ps.seed = seed;
        ps.sampling_rate = q;
        ps.unit_indptr = indptr.data();
        ps.unit_rows = rows.data();
        ps.n_units = indptr.size() - 1;
        ps.unit_cap = cap;
        std::vector<index_t> start;
        const std::vector<std::int64_t> out = unit_sample(ps, step, start);
        return py::make_tuple(py::array_t<std::int64_t>(static_cast<py::ssize_t>(out.size()), out.data()),
                              py::array_t<std::int64_t>(static_cast<py::ssize_t>(start.size()), start.data()));
      },
      py::arg("seed"), py::arg("step"), py::arg("q"), py::arg("unit_indptr"), py::arg("unit_rows"), py::arg("cap"),
      "The examples private step `step` trains on under the unit 'user' (units sampled at rate q, at most cap "
      "examples of each), and where each sampled unit's begin.");
  m.def(
      "dp_binomial",
      [](std::int64_t trials, double p, std::uint64_t seed) {
        if (trials < 0 || !(p >= 0.0 && p <= 1.0)) throw py::value_error("need trials >= 0 and p in [0, 1]");
        std::uint64_t rng = seed;
        return binomial_draw(trials, p, rng);
      },
      py::arg("trials"), py::arg("p"), py::arg("seed"), "A Binomial(trials, p) draw (the sparse mechanism's).");
  m.attr("DP_STREAMS") = py::dict(py::arg("gmf") = kStreamGmf, py::arg("field_grad") = kStreamFieldGrad,
                                  py::arg("field_count") = kStreamFieldCount,
                                  py::arg("false_positive") = kStreamFalsePositive, py::arg("sample") = kStreamSample,
                                  py::arg("negatives") = kStreamNegatives, py::arg("dropout") = kStreamDropout);
  py::class_<FieldHandle>(m, "FieldHandle",
                          "A validated field model over caller-owned arrays (docs/DESIGN.md, the field model).")
      .def(py::init<const py::dict&, bool>(), py::arg("spec"), py::arg("trainable") = false)
      .def("predict", &FieldHandle::predict, py::arg("keys"), py::arg("n_threads") = 0, py::arg("isa") = "auto")
      .def(
          "predict_one",
          [](const FieldHandle& h, const std::vector<std::int32_t>& keys) { return h.predict_one(keys.data(), keys.size()); },
          py::arg("keys"),
          "The output of one example given by its key values (ints): the single-row serving path (one thread, no "
          "arrays, a workspace kept between calls; callers hold the GIL, so one call at a time).")
      .def(
          "time_predict_one",
          [](const FieldHandle& h, const std::vector<std::int32_t>& keys, int calls) {
            const auto start = std::chrono::steady_clock::now();
            float sink = 0.0f;
            for (int c = 0; c < calls; ++c) sink += h.predict_one(keys.data(), keys.size());
            const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
            return py::make_tuple(took.count() / std::max(calls, 1), sink);
          },
          py::arg("keys"), py::arg("calls"),
          "Benchmark hook: seconds per predict_one call timed inside the core (no Python per call).")
      .def("loss_and_gradients", &FieldHandle::loss_and_gradients, py::arg("keys"), py::arg("y"), py::arg("weight"),
           py::arg("alpha"), py::arg("n_threads") = 0, py::arg("isa") = "auto")
      .def("train_epoch", &FieldHandle::train_epoch, py::arg("state1"), py::arg("state2"), py::arg("keys"),
           py::arg("y"), py::arg("weight"), py::arg("order"), py::arg("batch_size"), py::arg("alpha"),
           py::arg("optimizer"), py::arg("learning_rate"), py::arg("momentum"), py::arg("nesterov"),
           py::arg("beta_1"), py::arg("beta_2"), py::arg("epsilon"), py::arg("adam_t"), py::arg("sampler"),
           py::arg("epoch"), py::arg("n_threads") = 0, py::arg("isa") = "auto", py::arg("progress") = py::none())
      .def("train_private", &FieldHandle::train_private, py::arg("state1"), py::arg("state2"), py::arg("keys"),
           py::arg("y"), py::arg("weight"), py::arg("privacy"), py::arg("alpha"), py::arg("denominator"),
           py::arg("optimizer"), py::arg("learning_rate"), py::arg("momentum"), py::arg("nesterov"),
           py::arg("beta_1"), py::arg("beta_2"), py::arg("epsilon"), py::arg("adam_t"), py::arg("sampler"),
           py::arg("first_step"), py::arg("n_steps"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
           py::arg("progress") = py::none(),
           "DP-SGD steps (cpp/private.h): privacy dict {noise_multiplier, max_grad_norm, sampling_rate, sparse, "
           "count_noise, threshold, seed[, count_group][, unit_indptr, unit_rows, unit_cap: the unit 'user']}; the noised "
           "sum is divided by denominator. Returns (loss_sum, adam_t, "
           "rows, diverged, exception or None).")
      .def("example_norms", &FieldHandle::example_norms, py::arg("keys"), py::arg("y"), py::arg("weight"),
           py::arg("rows"), py::arg("sampler"), py::arg("privacy"), py::arg("step"), py::arg("n_threads") = 0,
           py::arg("isa") = "auto",
           "Gradient norm of each row of the batch examples[rows] plus its negatives (drawn as private step "
           "`step` draws them), before clipping (test hook).")
      .def("topk", &FieldHandle::topk, py::arg("sampler"), py::arg("users"), py::arg("candidates"), py::arg("k"),
           py::arg("exclude_seen"), py::arg("n_threads") = 0, py::arg("isa") = "auto", py::arg("approx_fraction") = 0.0,
           "Top-k of each user over the candidates (None: every item): (items int32 [n_users, k], scores float32), "
           "best first, ties by lower item; -1 / -inf padding. approx_fraction > 0: approximate, the best "
           "approx_fraction of the candidates by a per-user proxy rescored exactly (cpp/fields.h field_topk).")
      .def("topk_proxy", &FieldHandle::topk_proxy, py::arg("sampler"), py::arg("user"), py::arg("candidates"),
           py::arg("isa") = "auto",
           "The approximate top-k's first stage for one user (test hook): (sample items int32, surrogate "
           "coefficients float32 [fan_out(0) weights, intercept], proxy score of each candidate float32).")
      .def("topk_candidates", &FieldHandle::topk_candidates, py::arg("sampler"), py::arg("users"),
           py::arg("cand_indptr"), py::arg("cand_items"), py::arg("k"), py::arg("exclude_seen"),
           py::arg("n_threads") = 0, py::arg("isa") = "auto",
           "Top-k of each user over its own candidates (row u of the CSR cand_indptr int64 [n_users + 1], "
           "cand_items int32; a duplicate counts once): (items int32 [n_users, k], scores float32), best first, "
           "ties by lower item; -1 / -inf padding. Scores, seen-item exclusion and cache as topk.");

  py::class_<IdLookup>(m, "IdLookup",
                       "Entity number (1-based; 0: unknown) of one raw int id: a binary search of the sorted ids "
                       "(aligned int64), through order (the entity of each sorted id, or None: its position).")
      .def(py::init<py::array_t<std::int64_t, py::array::c_style>, py::object>(), py::arg("sorted"), py::arg("order"))
      .def("__call__", &IdLookup::entity, py::arg("id"));

  py::class_<PairScorer>(m, "PairScorer",
                         "One (user, item) pair of int ids -> its prediction as a float64 array of 1: id lookups, "
                         "the field model, + mean, clipped to [low, high]. Ids unknown to the sorted arrays read "
                         "entity 0.")
      .def(py::init<py::object, py::array_t<std::int64_t, py::array::c_style>, py::object,
                    py::array_t<std::int64_t, py::array::c_style>, py::object, double, double, double>(),
           py::arg("handle"), py::arg("user_sorted"), py::arg("user_order"), py::arg("item_sorted"),
           py::arg("item_order"), py::arg("mean"), py::arg("low"), py::arg("high"))
      .def("__call__", &PairScorer::operator(), py::arg("user"), py::arg("item"))
      .def("score", &PairScorer::score, py::arg("user"), py::arg("item"), "The same value as a Python float.")
      .def("scores", &PairScorer::scores, py::arg("users"), py::arg("items"),
           "The values of pairs (users[j], items[j]) (int64 arrays) as a float64 array, row by row.")
      .def("fast_calls", &PairScorer::fast_calls,
           "(predict_lists(users, items), score_ints(user, item)): plain C functions for two one-element lists "
           "of ints (-> __call__'s array) and two ints (-> score's float); None for anything else.")
      .def(
          "time_score",
          [](const PairScorer& s, std::int64_t user, std::int64_t item, int calls) {
            const auto start = std::chrono::steady_clock::now();
            double sink = 0.0;
            for (int c = 0; c < calls; ++c) sink += s.score(user, item);
            const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
            return py::make_tuple(took.count() / std::max(calls, 1), sink);
          },
          py::arg("user"), py::arg("item"), py::arg("calls"),
          "Benchmark hook: seconds per score call timed inside the core (no Python per call).");

  py::class_<RowScorer>(m, "RowScorer",
                        "FieldModel's one-row serving path: a row dict written into the one-row tables of a "
                        "FieldHandle (columns: (name, kind 'id'|'hash'|'call'|'numeric', cell, lookup, buckets, "
                        "mean, std)), then its predict_one; None when the row is not of that simple form.")
      .def(py::init<py::object, const py::list&>(), py::arg("handle"), py::arg("columns"))
      .def("__call__", &RowScorer::operator(), py::arg("row"), py::arg("scalars") = false);

  py::class_<TwoTowerHandle>(m, "TwoTowerHandle",
                             "A validated two-tower model over caller-owned arrays (docs/DESIGN.md, the two-tower "
                             "model): two field-model specs with loss 'tower'.")
      .def(py::init<const py::dict&, const py::dict&, bool, float, bool>(), py::arg("user_spec"),
           py::arg("item_spec"), py::arg("normalize"), py::arg("temperature"), py::arg("trainable") = false)
      .def_property_readonly("dim", &TwoTowerHandle::dim)
      .def("vectors", &TwoTowerHandle::vectors, py::arg("user_side"), py::arg("keys"), py::arg("scale") = 1.0f,
           py::arg("n_threads") = 0, py::arg("isa") = "auto")
      .def("loss_and_gradients", &TwoTowerHandle::loss_and_gradients, py::arg("users"), py::arg("items"),
           py::arg("y"), py::arg("weight"), py::arg("training"), py::arg("negatives"), py::arg("alpha"),
           py::arg("n_threads") = 0, py::arg("isa") = "auto")
      .def("train_epoch", &TwoTowerHandle::train_epoch, py::arg("user_state1"), py::arg("user_state2"),
           py::arg("item_state1"), py::arg("item_state2"), py::arg("users"), py::arg("items"), py::arg("y"),
           py::arg("weight"), py::arg("order"), py::arg("batch_size"), py::arg("alpha"), py::arg("optimizer"),
           py::arg("learning_rate"), py::arg("momentum"), py::arg("nesterov"), py::arg("beta_1"), py::arg("beta_2"),
           py::arg("epsilon"), py::arg("adam_t"), py::arg("training"), py::arg("epoch"), py::arg("n_threads") = 0,
           py::arg("isa") = "auto", py::arg("progress") = py::none());

  // ---- the sequential model's bf16 products (gemm.h bf16_gemm_rows; test and benchmark hook) ----
  m.def(
      "bf16_gemm_rows",
      [](py::handle a_obj, py::handle b_obj, bool trans_a, bool trans_b, const std::string& kernel,
         const std::string& isa, int n_threads, py::handle addend_obj, py::handle bias_obj, bool relu,
         py::handle mul_obj, py::handle residual_obj, py::handle drop_obj) {
        const GemmOperands g = gemm_operands(a_obj, b_obj, trans_a, trans_b);
        const index_t M = g.M, N = g.N, K = g.K;
        // The optional epilogue (the model's: v = relu(C + addend + bias) * (mul > 0)), each part optional.
        py::array addend, bias, mul;
        Epilogue e;
        if (!addend_obj.is_none()) {
          addend = checked<float>(addend_obj, "addend", 2, false);
          if (addend.shape(0) != M || addend.shape(1) != N) throw py::value_error("addend must have C's shape");
          e.addend = static_cast<const float*>(addend.data());
          e.ld_addend = N;
          e.addend_scale = 1.0f;
        }
        if (!bias_obj.is_none()) {
          bias = checked<float>(bias_obj, "bias", 1, false);
          if (bias.shape(0) != N) throw py::value_error("bias must have C's columns");
          e.bias = static_cast<const float*>(bias.data());
        }
        if (relu) e.act = Activation::Relu;
        if (!mul_obj.is_none()) {
          mul = checked<float>(mul_obj, "mul", 2, false);
          if (mul.shape(0) != M || mul.shape(1) != N) throw py::value_error("mul must have C's shape");
          e.mul = static_cast<const float*>(mul.data());
          e.ld_mul = N;
          e.mul_act = Activation::Relu;
        }
        const bool any = e.addend || e.bias || relu || e.mul;
        if (!residual_obj.is_none()) {  // bf16_gemm_rows_residual: a copy of residual += (a b + bias) * drop
          if (trans_a || trans_b || e.addend || relu || e.mul || drop_obj.is_none())
            throw py::value_error("residual takes drop and bias only, without transposes");
          py::array res = checked<float>(residual_obj, "residual", 2, false), drop = checked<float>(drop_obj, "drop", 2, false);
          if (res.shape(0) != M || res.shape(1) != N || drop.shape(0) != M || drop.shape(1) != N)
            throw py::value_error("residual and drop must have C's shape");
          py::array_t<float> x({M, N});
          std::memcpy(x.mutable_data(), res.data(), sizeof(float) * static_cast<std::size_t>(M * N));
          const Isa chosen = resolve_isa(isa);
          const KernelSet& ks = kernels_for(chosen);
          const bool native = resolve_bf16_kernel(kernel, chosen);
          const float* pd = static_cast<const float*>(drop.data());
          float* px = x.mutable_data();
          bool done = false;
          {
            const CoreCall call;
            done = bf16_gemm_rows_residual(ks, native, M, N, K, g.pa(), g.a.shape(1), g.pb(), g.b.shape(1), e.bias,
                                           pd, px, N, n_threads);
          }
          if (!done) throw py::value_error("residual: needs the avx512_bf16 kernel and K within one block");
          return x;
        }
        const Isa chosen = resolve_isa(isa);
        const bool native = resolve_bf16_kernel(kernel, chosen);
        const KernelSet& ks = kernels_for(chosen);
        py::array_t<float> c({M, N});
        float* pc = c.mutable_data();
        {
          const CoreCall call;
          bf16_gemm_rows(ks, native, trans_a, trans_b, M, N, K, g.pa(), g.a.shape(1), g.pb(), g.b.shape(1), pc, N,
                         any ? &e : nullptr, n_threads);
        }
        return c;
      },
      py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
      py::arg("kernel") = "auto", py::arg("isa") = "auto", py::arg("n_threads") = 0, py::arg("addend") = py::none(),
      py::arg("bias") = py::none(), py::arg("relu") = false, py::arg("mul") = py::none(),
      py::arg("residual") = py::none(), py::arg("drop") = py::none(),
      "bf16_gemm's product (the same bits) by the row-major-A path the sequential model uses; then, if given, "
      "the epilogue relu(C + addend + bias) * (mul > 0), each part optional (the ReLU and the mask applied only "
      "when asked). residual (with drop, optional bias): returns a copy of residual += (a b + bias) * drop "
      "(bf16_gemm_rows_residual, the model's dropout residual).");
  py::class_<SequentialHandle>(m, "SequentialModel",
                               "A validated sequential model (docs/DESIGN.md, \"Sequential model (issue 13)\") over a "
                               "params dict of caller-owned float32 arrays, updated in place by train_epoch.")
      .def(py::init<const py::dict&, bool, const std::string&, const std::string&>(), py::arg("params"),
           py::arg("trainable") = false, py::arg("precision") = "float32", py::arg("bf16_kernel") = "auto",
           "precision 'bf16': in training (loss_and_gradients, train_epoch) the projection and feed-forward products "
           "(forward and both backward) in bfloat16 (operands rounded, float32 sums; bf16_kernel as bf16_gemm's, "
           "resolved per call against its isa); forward (scoring) is float32 always.")
      .def_property_readonly("dim", &SequentialHandle::dim)
      .def_property_readonly("precision", &SequentialHandle::precision)
      .def_property_readonly("max_len", &SequentialHandle::max_len)
      .def("forward", &SequentialHandle::forward, py::arg("seqs"), py::arg("last_only") = false,
           py::arg("n_threads") = 0, py::arg("isa") = "auto")
      .def("loss_and_gradients", &SequentialHandle::loss_and_gradients, py::arg("seqs"), py::arg("targets"),
           py::arg("negatives"), py::arg("dropout") = 0.0, py::arg("stream") = 0, py::arg("n_threads") = 0,
           py::arg("isa") = "auto", py::arg("log_q") = py::none())
      .def("epoch_batches", &SequentialHandle::epoch_batches, py::arg("indptr"), py::arg("items"), py::arg("order"),
           py::arg("batch_size"), py::arg("training"), py::arg("epoch"))
      .def("train_epoch", &SequentialHandle::train_epoch, py::arg("state1"), py::arg("state2"), py::arg("indptr"),
           py::arg("items"), py::arg("order"), py::arg("batch_size"), py::arg("training"), py::arg("dropout"),
           py::arg("solver"), py::arg("learning_rate"), py::arg("beta_1"), py::arg("beta_2"), py::arg("epsilon"),
           py::arg("adam_t"), py::arg("epoch"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
           py::arg("progress") = py::none());

  // One-shot forms over a spec dict (a handle built and used once), as documented in docs/DESIGN.md.
  m.def(
      "field_predict",
      [](const py::dict& spec, const py::list& keys, int n_threads, const std::string& isa) {
        return FieldHandle(spec, false).predict(keys, n_threads, isa);
      },
      py::arg("spec"), py::arg("keys"), py::arg("n_threads") = 0, py::arg("isa") = "auto");
  m.def(
      "field_loss_and_gradients",
      [](const py::dict& spec, const py::list& keys, py::handle y, py::handle weight, float alpha, int n_threads,
         const std::string& isa) {
        return FieldHandle(spec, false).loss_and_gradients(keys, y, weight, alpha, n_threads, isa);
      },
      py::arg("spec"), py::arg("keys"), py::arg("y"), py::arg("weight"), py::arg("alpha"), py::arg("n_threads") = 0,
      py::arg("isa") = "auto");
  m.def(
      "field_train_epoch",
      [](const py::dict& spec, const py::list& keys, py::handle y, py::handle weight, py::handle order,
         index_t batch_size, float alpha, const std::string& solver, float learning_rate, float momentum,
         bool nesterov, float beta_1, float beta_2, float epsilon, std::int64_t adam_t, py::handle sampler,
         std::uint64_t epoch, int n_threads, const std::string& isa) {
        FieldHandle handle(spec, true);
        return handle.train_epoch(spec["state1"].cast<py::list>(), spec["state2"].cast<py::list>(), keys, y, weight,
                                  order, batch_size, alpha, solver, learning_rate, momentum, nesterov, beta_1, beta_2,
                                  epsilon, adam_t, sampler, epoch, n_threads, isa, py::none());
      },
      py::arg("spec"), py::arg("keys"), py::arg("y"), py::arg("weight"), py::arg("order"), py::arg("batch_size"),
      py::arg("alpha"), py::arg("optimizer"), py::arg("learning_rate"), py::arg("momentum"), py::arg("nesterov"),
      py::arg("beta_1"), py::arg("beta_2"), py::arg("epsilon"), py::arg("adam_t"), py::arg("sampler"),
      py::arg("epoch"), py::arg("n_threads") = 0, py::arg("isa") = "auto");
  m.def(
      "field_topk",
      [](const py::dict& spec, py::handle sampler, py::handle users, py::handle candidates, index_t k,
         bool exclude_seen, int n_threads, const std::string& isa) {
        return FieldHandle(spec, false).topk(sampler, users, candidates, k, exclude_seen, n_threads, isa);
      },
      py::arg("spec"), py::arg("sampler"), py::arg("users"), py::arg("candidates"), py::arg("k"),
      py::arg("exclude_seen"), py::arg("n_threads") = 0, py::arg("isa") = "auto");
  m.def("inner_product_topk", &inner_product_topk_py, py::arg("queries"), py::arg("items"), py::arg("k"),
        py::arg("candidates") = py::none(), py::arg("exclude") = py::none(), py::arg("exclude_rows") = py::none(),
        py::arg("n_threads") = 0, py::arg("isa") = "auto",
        "Exact top-k items by inner product with each query: (items int32 [n, k], scores float32 [n, k]), best "
        "first, ties by lower item; -1 / -inf padding. candidates: int32 item rows (a duplicate counts once); "
        "exclude: (indptr int64, items int32) sorted rows of items to skip, row exclude_rows[q] (default q) for "
        "query q.");

  // AutoRec (cpp/autorec.h)
  m.def("autorec_hidden", &autorec_hidden_py, py::arg("params"), py::arg("X"), py::arg("activation"),
        py::arg("n_threads") = 0, py::arg("isa") = "auto", "AutoRec codes act(X W_enc + b_enc), float32 (rows, hidden).");
  m.def("autorec_predict", &autorec_predict_py, py::arg("params"), py::arg("X"), py::arg("q_indptr"), py::arg("q_cols"),
        py::arg("activation"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
        "Reconstruction of each row of X read at its query columns (q_indptr, q_cols): float32 (len(q_cols),).");
  m.def("autorec_loss_and_gradients", &autorec_loss_and_gradients_py, py::arg("params"), py::arg("X"), py::arg("t"),
        py::arg("l2"), py::arg("activation"), py::arg("n_threads") = 0, py::arg("isa") = "auto",
        "(loss, [dW_enc, db_enc, dW_dec, db_dec]) of X as one batch, masked to its entries (cpp/autorec.h).");
  m.def("autorec_train_epoch", &autorec_train_epoch_py, py::arg("params"), py::arg("state1"), py::arg("state2"),
        py::arg("X"), py::arg("t"), py::arg("order"), py::arg("batch_size"), py::arg("l2"), py::arg("activation"),
        py::arg("solver"), py::arg("learning_rate"), py::arg("beta_1") = 0.9f, py::arg("beta_2") = 0.999f,
        py::arg("epsilon") = 1e-8f, py::arg("adam_t") = 0, py::arg("n_threads") = 0, py::arg("isa") = "auto",
        py::arg("progress") = py::none(),
        "One epoch over rows order of X in batches: (loss_sum, adam_t, rows, diverged, exception or None).");
  // ---- Mult-VAE / Mult-DAE ----
  m.def(
      "autoencoder_forward",
      [](const py::list& coefs, const py::list& intercepts, std::size_t n_encoder, bool variational, py::handle X,
         int n_threads, const std::string& isa) {
        const AutoencoderNet net = make_autoencoder(coefs, intercepts, n_encoder, variational, false);
        const CsrView x = autoencoder_input(X, net);
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        py::array_t<float> out({x.rows, net.n_items()});
        float* po = out.mutable_data();
        {
          const CoreCall call;
          autoencoder_forward(ks, net, x, po, n_threads);
        }
        return out;
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("n_encoder"), py::arg("variational"), py::arg("X"),
      py::arg("n_threads") = 0, py::arg("isa") = "auto",
      "The logits (rows, n_items) of each CSR bag of X (no dropout; the VAE scores z = mu).");
  m.def(
      "autoencoder_loss_and_gradients",
      [](const py::list& coefs, const py::list& intercepts, std::size_t n_encoder, bool variational, py::handle X,
         py::handle input_scale, py::handle eps, float beta, float l2, int n_threads, const std::string& isa,
         const std::string& precision, const std::string& bf16_kernel) {
        AutoencoderNet net = make_autoencoder(coefs, intercepts, n_encoder, variational, false);
        set_precision(net, precision, bf16_kernel, isa);
        const CsrView x = autoencoder_input(X, net);
        const float* ps = optional_array<float>(input_scale, "input_scale", x.indptr[x.rows], false);
        const float* pe = nullptr;
        if (!eps.is_none()) {
          py::array e = checked<float>(eps, "eps", 2, false);
          require_shape(e, "eps", x.rows, net.latent());
          pe = static_cast<const float*>(e.data());
        }
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        py::list coef_grads, intercept_grads;
        std::vector<float*> gw, gb;
        for (const Layer& layer : net.layers) {
          py::array_t<float> w({layer.fan_in, layer.fan_out}), b(layer.fan_out);
          gw.push_back(w.mutable_data());
          gb.push_back(b.mutable_data());
          coef_grads.append(w);
          intercept_grads.append(b);
        }
        AutoencoderLoss loss;
        {
          const CoreCall call;
          loss = autoencoder_loss_and_gradients(ks, net, x, ps, pe, beta, l2, gw, gb, n_threads);
        }
        return py::make_tuple(loss.loss, loss.nll, loss.kl, coef_grads, intercept_grads);
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("n_encoder"), py::arg("variational"), py::arg("X"),
      py::arg("input_scale"), py::arg("eps"), py::arg("beta"), py::arg("l2"), py::arg("n_threads") = 0,
      py::arg("isa") = "auto", py::arg("precision") = "float32", py::arg("bf16_kernel") = "auto",
      "(loss, mean nll, mean KL, coef_grads, intercept_grads) of all rows of X as one batch, with the given "
      "noise: input_scale (nnz multipliers of the normalised entries, or None) and eps (rows x latent, or None: "
      "z = mu). precision 'bf16': the output layer's products in bfloat16.");
  m.def(
      "autoencoder_noise",
      [](py::handle X, py::handle rows, index_t latent, float dropout, std::uint64_t seed, std::int64_t step) {
        const CsrView x = make_input(X, X.cast<py::tuple>()[3].cast<index_t>()).csr;
        const std::int64_t* pr = optional_array<std::int64_t>(rows, "rows", x.rows, false);
        if (!pr) throw py::value_error("rows must be given");
        if (!(dropout >= 0.0f && dropout < 1.0f)) throw py::value_error("dropout must be in [0, 1)");
        AutoencoderTraining training;
        training.dropout = dropout;
        training.seed = seed;
        py::array_t<float> scale(x.indptr[x.rows]), eps({x.rows, latent});
        autoencoder_noise(kernels_for(resolve_isa("auto")), training, step, pr, x, latent, scale.mutable_data(),
                          eps.mutable_data());
        return py::make_tuple(scale, eps);
      },
      py::arg("X"), py::arg("rows"), py::arg("latent"), py::arg("dropout"), py::arg("seed"), py::arg("step"),
      "(input_scale, eps): the training noise of the batch of Adam step `step` whose bags are X's rows, data rows "
      "`rows` (see multvae.h).");
  m.def(
      "autoencoder_train_epoch",
      [](const py::list& coefs, const py::list& intercepts, std::size_t n_encoder, bool variational,
         const py::list& state1, const py::list& state2, std::int64_t adam_t, float learning_rate, py::handle X,
         py::handle order_obj, index_t batch_size, float dropout, float beta_max, std::int64_t anneal_steps, float l2,
         std::uint64_t seed, int n_threads, const std::string& isa, const std::string& precision,
         const std::string& bf16_kernel) {
        AutoencoderNet net = make_autoencoder(coefs, intercepts, n_encoder, variational, true);
        set_precision(net, precision, bf16_kernel, isa);
        const CsrView x = autoencoder_input(X, net);
        const auto [po, n_order] = checked_order(order_obj, x.rows, batch_size);
        if (!(dropout >= 0.0f && dropout < 1.0f)) throw py::value_error("dropout must be in [0, 1)");
        Optimizer opt;
        opt.solver = Solver::Adam;
        opt.learning_rate = learning_rate;
        opt.adam_t = adam_t;
        opt.state1 = autoencoder_states(state1, "state1", net);
        opt.state2 = autoencoder_states(state2, "state2", net);
        AutoencoderTraining training;
        training.dropout = dropout;
        training.beta_max = beta_max;
        training.anneal_steps = anneal_steps;
        training.l2 = l2;
        training.seed = seed;
        const KernelSet& ks = kernels_for(resolve_isa(isa));
        EpochResult r;
        {
          const CoreCall call;
          r = autoencoder_train_epoch(ks, net, opt, training, x, po, n_order, batch_size, n_threads);
        }
        return py::make_tuple(r.loss_sum, opt.adam_t, r.rows, r.diverged);
      },
      py::arg("coefs"), py::arg("intercepts"), py::arg("n_encoder"), py::arg("variational"), py::arg("state1"),
      py::arg("state2"), py::arg("adam_t"), py::arg("learning_rate"), py::arg("X"), py::arg("order"),
      py::arg("batch_size"), py::arg("dropout"), py::arg("beta_max"), py::arg("anneal_steps"), py::arg("l2"),
      py::arg("seed"), py::arg("n_threads") = 0, py::arg("isa") = "auto", py::arg("precision") = "float32",
      py::arg("bf16_kernel") = "auto",
      "Adam steps over batches of X's rows in `order`, parameters and moments updated in place. Returns "
      "(loss_sum, adam_t, rows, diverged). precision 'bf16': the output layer's products in bfloat16.");
}
