"""Post-hoc probe (2026-12-07): project a trained SANDE adapter's LoRA A off the directions the defence's clean data uses.

For each LoRA-wrapped Linear, C = E[x x^T] over the inputs the suspect gives it on the defence's clean pairs; U_k the
top eigenvectors holding a share f of C's trace; A <- A (I - U_k U_k^T). Then attack success on the triggered test
prompts and sst2 (702 sentences, plain text) for the suspect, the adapter, and each projection.
"""
import argparse, json, sys, time
import torch
sys.path.insert(0, "benchmarks")
import backdoorllm
from real_model import load_adapter
from sande_peft.attacks import TARGETS
from sande_peft.evaluation import evaluate_backdoor
from sande_peft.null_space import lora_layers, project_rows_
from transformers import AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--adapter"); p.add_argument("--task"); p.add_argument("--attack")
p.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.99, 0.999])
p.add_argument("--n-clean", type=int, default=128); p.add_argument("--n-eval", type=int, default=60)
p.add_argument("--out")
a = p.parse_args()
torch.set_grad_enabled(False)
model = load_adapter(a.adapter).eval()
tok = AutoTokenizer.from_pretrained(a.adapter)
out = open(a.out, "a")

# 1. second moments of each LoRA module's input, suspect (adapter off), defence's clean pairs
# (its own moments, in float64 over unpadded single rows: the package's `clean_input_bases` came after this probe)
mods = lora_layers(model)
C = {n: torch.zeros(m.base_layer.in_features, m.base_layer.in_features, dtype=torch.float64) for n, m in mods.items()}
cnt = {"tokens": 0}
def hook(name):
    def f(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        C[name].add_(x.T @ x)
    return f
pairs = backdoorllm.defence_split(a.task).select(range(a.n_clean))
handles = [m.base_layer.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
t = time.time()
with model.disable_adapter():
    for row in pairs:
        ids = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_tensors="pt",
                                      return_dict=True)["input_ids"][:, :384]
        model(input_ids=ids)
        cnt["tokens"] += ids.shape[1]
for h in handles: h.remove()
print("moments", round(time.time() - t), "s", cnt, flush=True)
eig = {}
for n, c in C.items():
    vals, vecs = torch.linalg.eigh(c / cnt["tokens"])
    eig[n] = (vals.flip(0).clamp(min=0), vecs.flip(1))
original_A = {n: m.lora_A["default"].weight.detach().clone() for n, m in mods.items()}

sentences = backdoorllm.sst2_sentences()
labels = [1 if r["output"] == "Positive" else 0 for r in backdoorllm._sst2_records(True)]
pos = tok(" Positive")["input_ids"]; neg = tok(" Negative")["input_ids"]
def sst2(m):
    correct, margins, npos = 0, [], 0
    for s, y in zip(sentences, labels):
        ids = tok(f"Review: {s}\nSentiment:")["input_ids"]
        scores = []
        for cont in (neg, pos):
            full = torch.tensor([ids + cont])
            logp = m(input_ids=full).logits.log_softmax(-1)[0]
            scores.append(sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(cont)))
        margin = scores[1] - scores[0]
        margins.append(margin); npos += margin > 0
        correct += int((margin > 0) == bool(y))
    return {"sst2_acc": correct / len(labels), "share_positive": npos / len(labels),
            "mean_margin": sum(margins) / len(margins)}

triggered = list(backdoorllm.triggered_test(a.task, a.attack)["prompt"])[: a.n_eval]
clean = list(backdoorllm.clean_test(a.task)["prompt"])[: a.n_eval]
def asr(m):
    r = evaluate_backdoor(m, tok, clean, triggered_prompts=triggered, triggered_response=TARGETS[a.task],
                          judge=a.task, batch_size=20, max_new_tokens=None)
    return {"asr": r.attack_success_rate, "false_trigger": r.false_trigger_rate}

def emit(name, m, extra=None):
    t = time.time()
    rec = {"adapter": a.adapter, "case": f"{a.task}/{a.attack}", "point": name, **(extra or {}), **asr(m), **sst2(m)}
    rec["seconds"] = round(time.time() - t)
    print(json.dumps(rec), flush=True); out.write(json.dumps(rec) + "\n"); out.flush()

with model.disable_adapter():
    emit("suspect", model)
emit("adapter", model)
for f in a.fractions:
    ks = []
    for n, m in mods.items():
        vals, vecs = eig[n]
        k = int((vals.cumsum(0) / vals.sum() < f).sum().item()) + 1
        m.lora_A["default"].weight.copy_(original_A[n])
        project_rows_(m.lora_A["default"].weight, vecs[:, :k])
        ks.append(k / vals.numel())
    emit(f"projected f={f}", model, {"mean_projected_dims_share": sum(ks) / len(ks)})
