"""``kiln ppo``: train a causal LM with PPO against a rule-based reward; ``--demo`` runs the built-in example.

The demo: the bundled Shakespeare model is asked for speeches (prompts are speaker cues such as ``"ROMEO.\\n"``
and opening words), and is rewarded for the share of its words that come from a word list (default: words of
affection and the intimate thee/thy/thou). Mean reward on held-out prompts is measured before and after; the KL
to the reference is reported and plotted.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

DEMO_WORDS = ("love", "sweet", "heart", "dear", "gentle", "fair", "kind", "joy", "good", "grace", "friend", "happy",
              "hope", "smile", "peace", "bless", "thee", "thy", "thou")
DEMO_SPEAKERS = ("ROMEO", "JULIET", "HAMLET", "OPHELIA", "MACBETH", "LADY MACBETH", "KING LEAR", "CORDELIA",
                 "OTHELLO", "DESDEMONA", "PORTIA", "BRUTUS", "CASSIUS", "PROSPERO", "MIRANDA", "ROSALIND",
                 "ORLANDO", "VIOLA", "BENEDICK", "BEATRICE", "FALSTAFF", "KING HENRY", "QUEEN MARGARET",
                 "GLOUCESTER", "HORATIO", "IAGO", "ANTONIO", "SHYLOCK", "PUCK", "OBERON", "TITANIA", "HELENA")
DEMO_OPENINGS = ("My lord,", "Good morrow,", "I pray you,", "Now, by my troth,", "O, ", "What say you,",
                 "Tell me,", "Come, come,", "Alas,", "Hark,", "Peace,", "Why, ")


def demo_prompts() -> list[str]:
    """Speaker cues alone and with an opening phrase, in the bundled model's play format (``NAME.\\n``)."""
    out = [f"{s}.\n" for s in DEMO_SPEAKERS]
    out += [f"{s}.\n{o}" for i, s in enumerate(DEMO_SPEAKERS) for o in DEMO_OPENINGS[i % 3::4]]
    return out


def load_reward(spec: str | None, words: str | None):
    from kiln.rl import WordListReward

    if spec:
        if ":" not in spec:
            raise ValueError(f"--reward must be module:function, got {spec!r}")
        module, name = spec.split(":", 1)
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"--reward {spec}: {name} is not a callable in {module}")
        return fn
    return WordListReward([w for w in (words or ",".join(DEMO_WORDS)).split(",")])


def add_parsers(sub) -> None:
    p = sub.add_parser("ppo", help="PPO fine-tuning with kiln.llm rollouts (TRL's algorithm); --demo for the example")
    p.add_argument("--demo", action="store_true", help="built-in example: the model learns to use a word list more")
    p.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: the bundled model)")
    p.add_argument("--prompts", default=None, help="JSONL prompts ({'prompt': ...} per line); the demo has its own")
    p.add_argument("--reward", default=None, help="Python reward fn(prompts, responses) -> scores, as module:function")
    p.add_argument("--words", default=None, help=f"comma-separated word list reward (default: {','.join(DEMO_WORDS)})")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations (sets total_episodes)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per iteration (per_device_train_batch_size)")
    p.add_argument("--num-mini-batches", type=int, default=2)
    p.add_argument("--num-ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1")
    p.add_argument("--adaptive-kl", type=float, default=None, metavar="TARGET",
                   help="adapt kl_coef towards this KL (nats/response), starting from --kl-coef")
    p.add_argument("--kl-horizon", type=int, default=10000, help="adaptive KL horizon in episodes")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (peft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the model with FSDP2 instead of replicating it with DDP")
    p.add_argument("--torch-compile", action="store_true",
                   help="compile the training forward (PPOConfig.torch_compile): faster steps after a compile of "
                        "about two minutes, for long runs")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every training step eagerly (PPOConfig.cuda_graphs=False); by default a CUDA run "
                        "replays each micro-step from a CUDA graph")
    p.add_argument("--eval-size", type=int, default=32, help="held-out prompts for the before/after reward")
    p.add_argument("--output-dir", default=None, help="checkpoint, stats JSON and ppo_curves.png go here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from kiln.data.prompts import PromptDataset, mix, train_eval_split
    from kiln.models import default_model_path
    from kiln.rl import PPOConfig, PPOTrainer, plot_stats

    model = Path(args.model) if args.model else default_model_path()
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {model} (config.json missing)")
    if args.prompts:
        prompts = PromptDataset(args.prompts)
    elif args.demo:
        texts = demo_prompts()
        cues = [t for t in texts if t.endswith(".\n")]
        prompts = mix(PromptDataset(cues), PromptDataset([t for t in texts if not t.endswith(".\n")]))
    else:
        raise ValueError("give --prompts FILE.jsonl, or --demo for the built-in example")
    train, evals = train_eval_split(prompts, min(args.eval_size, len(prompts) // 4), seed=args.seed)
    iterations = args.iterations or (30 if args.demo else 100)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun each process samples --batch-size prompts
    cfg = PPOConfig(per_device_train_batch_size=args.batch_size, num_mini_batches=args.num_mini_batches,
                    num_ppo_epochs=args.num_ppo_epochs, response_length=args.response_length,
                    learning_rate=args.learning_rate, kl_coef=args.kl_coef, kl_estimator=args.kl_estimator,
                    temperature=args.temperature, seed=args.seed, adap_kl_ctrl=args.adaptive_kl is not None,
                    target=args.adaptive_kl or 6.0, horizon=args.kl_horizon,
                    total_episodes=iterations * args.batch_size * world,
                    output_dir=args.output_dir, num_sample_generations=5, fsdp=args.fsdp,
                    torch_compile=args.torch_compile, cuda_graphs=not args.no_cuda_graphs)
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    reward = load_reward(args.reward, args.words)
    trainer = PPOTrainer(cfg, model=model, reward_model=reward, train_dataset=train, eval_dataset=evals,
                         peft_config=peft_config, device=args.device)
    if trainer.rank > 0:  # under torchrun: rank 0 reports and writes; the others train and evaluate in step with it
        trainer.evaluate()
        trainer.train(progress=False)
        trainer.evaluate()
        return 0
    print(f"kiln ppo: {model} on {trainer.device}; {len(train)} train / {len(evals)} eval prompts; "
          f"{cfg.num_total_batches} iterations of {cfg.batch_size}; reward {reward!r}")
    t0 = time.perf_counter()
    before = trainer.evaluate()
    print(f"before: mean reward {before['eval/scores']:.4f} on {len(evals)} held-out prompts")
    trainer.train(progress=not args.no_progress)
    after = trainer.evaluate()
    wall = time.perf_counter() - t0
    last = trainer.history[-1]
    print(f"after:  mean reward {after['eval/scores']:.4f} (before {before['eval/scores']:.4f}); "
          f"KL to reference {last['objective/kl']:.3f} nats/response; {wall:.1f} s")
    sample = trainer.generate([evals[0]], seed=7)
    print(f"sample: {sample.prompts[0]!r} -> {sample.texts[0]!r}")
    if args.output_dir:
        out = Path(args.output_dir)
        trainer.history[0]["eval/scores"] = before["eval/scores"]
        trainer.history[-1]["eval/scores"] = after["eval/scores"]
        try:
            plot_stats(trainer.history, out / "ppo_curves.png", title=f"kiln ppo on {trainer.device}")
        except ImportError:
            print("matplotlib is not installed: no plot")
        (out / "demo_result.json").write_text(json.dumps({
            "model": str(model), "before": before, "after": after, "wall_s": wall, "config": cfg.to_dict(),
            "final_kl": last["objective/kl"], "history": trainer.history}, indent=1))
        print(f"wrote {out}/ppo_curves.png and demo_result.json")
    return 0
