// The autograd node of an eager reduced loss on the CPU backend (see
// kdkernels/_ops.py, run): the forward pass already computed the inputs'
// gradients for a unit upstream gradient, so the backward only scales them.
// The same rule as the custom ops' Python backward (_ops._scale_saved), as a
// C++ node: right after the large GEMMs of LSH and SP have flushed the caches,
// each Python frame and small op of a backward costs tens of microseconds.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "kdkernels.h"

namespace kdk {
namespace {

using torch::autograd::variable_list;

// Whether g is a CPU scalar holding exactly 1 (read in place: no op, no sync).
bool is_unit(const Tensor& g) {
  if (!g.device().is_cpu() || g.numel() != 1 || g.requires_grad() || g.is_conj() || g.is_neg()) return false;
  bool unit = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "kdkernels is_unit", [&] {
    unit = static_cast<double>(*g.const_data_ptr<scalar_t>()) == 1.0;
  });
  return unit;
}

struct ScaledGradsBackward : public torch::autograd::Node {
  std::vector<Tensor> grads;  // per input: its gradient for a unit upstream gradient (numel 0: none)

  variable_list apply(variable_list&& upstream) override {
    variable_list out(grads.size());
    TORCH_CHECK(!grads.empty() || num_outputs() == 0,
                "kdkernels: this loss's backward already ran and its gradients were freed; "
                "pass retain_graph=True to the first backward to run it twice");
    const Tensor& g = upstream[0];
    if (!g.defined()) return out;  // an undefined upstream gradient (none materialised)
    const bool unit = is_unit(g);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].numel() == 0 || !task_should_compute_output(i)) continue;
      out[i] = unit ? grads[i] : grads[i] * g.to(grads[i].scalar_type());
    }
    return out;
  }
  void release_variables() override { grads.clear(); }  // no retain_graph: done after one backward
  std::string name() const override { return "kdkernels::ScaledGradsBackward"; }
};

}  // namespace

Tensor attach_scaled_grads(Tensor loss, const std::vector<std::optional<Tensor>>& inputs, std::vector<Tensor> grads) {
  TORCH_CHECK(!loss.requires_grad() && inputs.size() == grads.size(),
              "kdkernels attach_scaled_grads: a loss without history and one gradient per input");
  auto node = c10::make_intrusive<ScaledGradsBackward>();
  variable_list vars;  // None -> undefined: no edge
  for (const auto& x : inputs) vars.push_back(x.has_value() ? *x : Tensor());
  node->set_next_edges(torch::autograd::collect_next_edges(vars));
  node->grads = std::move(grads);
  torch::autograd::create_gradient_edge(loss, std::move(node));
  return loss;
}

}  // namespace kdk
