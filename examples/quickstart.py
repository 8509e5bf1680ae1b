"""Quickstart: MoHD on a tiny Llama built from a config (random weights, no downloads).

    python examples/quickstart.py

1. `explain` shows which layers MoHD rewrites, and what it leaves dense and why.
2. `mohdify` rewrites the model in place at density 0.5 (4 shared + 4 of 12 routed groups of 16).
3. The same `generate` as before runs on the rewritten model (random weights: the tokens are
   arbitrary; what matters is that the HF model keeps working).
4. Parameter accounting: total vs activated per token; `demohdify` restores the dense weights.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mohdify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 12))
    inputs = {"input_ids": prompt}
    dense_tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0)

    cfg = mohdify.MoHDConfig(num_groups=16, num_shared=4, top_k=4, router="learned", scaling="none")
    print(mohdify.explain(model, inputs, cfg), "\n")

    mohdify.mohdify(model, cfg, example_inputs=inputs)
    print(f"mohdified in place: still a {type(model).__name__}, {len(mohdify.branches(model))} MoHD branches, "
          f"density {cfg.density:.2f}")
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)
    print("generated (dense) :", dense_tokens[0, prompt.shape[1]:].tolist())
    print("generated (MoHD)  :", tokens[0, prompt.shape[1]:].tolist())
    model.train()                                       # training mode: MoHD keeps the balance loss
    loss = model(input_ids=prompt, labels=prompt).loss + mohdify.aux_loss(model)   # a training step's loss
    loss.backward()
    routers = [b.router.grad.abs().sum().item() for b in mohdify.branches(model)]
    print(f"training loss with the balance loss {loss.item():.4f}; "
          f"routers got gradients: {all(g > 0 for g in routers)}")
    model.zero_grad(set_to_none=True)

    totals = model.mohd_plan.totals()
    n_all = sum(p.numel() for p in model.parameters())
    print(f"\nparameters: {n_all:,} total after the rewrite (routers included); "
          f"in MoHD branches {totals['params']:,}, activated per token {totals['active_params']:,} "
          f"({totals['active_params'] / totals['params']:.0%})")
    print(f"FLOPs per token in MoHD branches: {totals['flops']:,} dense -> {totals['active_flops']:,} activated")

    mohdify.demohdify(model)
    back = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                          do_sample=False, pad_token_id=0)
    print("after demohdify, generate matches the dense model:", torch.equal(back, dense_tokens))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
