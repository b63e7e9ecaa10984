"""`earlyexit train backbone`: fine-tune (or train) a backbone with cross-entropy."""

from __future__ import annotations

import argparse
import os

from earlyexit.cli.common import (add_backend_argument, add_batch_size_argument, add_device_arguments,
                                  add_model_argument, add_output_argument, add_overwrite_argument, device_options,
                                  non_negative_int,
                                  positive_int, quiet_transformers, report_plugin_failures)
from earlyexit.core.model_folder import save_model_folder
from earlyexit.data.registry import load_dataset
from earlyexit.plugins.registry import get_registry, notify
from earlyexit.training.deepspeed_config import add_arguments, config_from_arguments, is_main_process
from earlyexit.util.files import check_replaceable, check_writable


class TrainCommand:
    """`earlyexit train backbone`: fine-tune (or train) a backbone with cross-entropy (paper §3.2)."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("train", help="train a backbone", description=TrainCommand.__doc__)
        parser.add_argument("what", choices=["backbone"], help="what to train")
        add_backend_argument(parser)
        add_model_argument(parser)
        add_device_arguments(parser)
        parser.add_argument("--data", required=True, action="append",
                            help="training data (repeatable to mix), e.g. scenes and scenes-vqa")
        parser.add_argument("--split", default="train")
        add_output_argument(parser, "folder for checkpoints (OUTPUT/checkpoints) and the trained model (OUTPUT/model); "
                                    "other files in it are left alone")
        add_overwrite_argument(parser, "OUTPUT/model")
        parser.add_argument("--steps", type=positive_int, default=1000)
        add_batch_size_argument(parser, 32)
        parser.add_argument("--learning-rate", type=float, default=1e-4)
        parser.add_argument("--warmup-steps", type=non_negative_int, default=100)
        parser.add_argument("--checkpoint-every", type=positive_int, default=200)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--freeze-vision", action="store_true",
                            help="train only the Q-Former, projection and language model")

        add_arguments(parser)
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        # lazy: keeps --help and list free of torch
        from earlyexit.training.batching import TrainingBatches, language_model_step
        from earlyexit.training.deepspeed import DeepSpeedEngine  # lazy: keeps --help and list free of torch
        # lazy: keeps --help and list free of torch
        from earlyexit.training.loop import TrainConfig, latest_checkpoint, train

        placement = device_options(args)  # a device or dtype this machine cannot run fails first
        check_writable(args.output, folder=True)
        final = os.path.join(args.output, "model")
        check_replaceable(final, args.overwrite)  # a model folder earlyexit did not write: one line, before the work
        config = TrainConfig(output_dir=os.path.join(args.output, "checkpoints"), steps=args.steps,
                             learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                             checkpoint_every=args.checkpoint_every, seed=args.seed)

        ds_config = config_from_arguments(args, args.batch_size, dtype=placement["dtype"])  # fail fast
        registry = get_registry()
        report_plugin_failures(registry)
        datasets = [load_dataset(spec, args.split) for spec in args.data]
        quiet_transformers()
        from earlyexit.models.loading import load_backend  # lazy: torch-free --help and list

        backend = load_backend(registry.backend(args.backend), args.model, **placement)
        if args.freeze_vision:
            for parameter in backend.model.vision_model.parameters():
                parameter.requires_grad_(False)
        batches = TrainingBatches(backend, datasets, batch_size=args.batch_size, seed=args.seed)
        engine = DeepSpeedEngine({"model": backend.model}, config, ds_config) if ds_config else None
        if latest_checkpoint(config.output_dir) and is_main_process():
            print(f"resuming from {latest_checkpoint(config.output_dir)}")
        run_config = {"command": "train backbone", "backend": args.backend, "model": args.model, "data": args.data,
                      "output": args.output, "steps": args.steps}
        notify(registry, "run_start", config=run_config)
        losses = train(backend.model, language_model_step(backend.model), batches, config, engine,
                       on_log=lambda step, recent: notify(registry, "batch_stats",
                                                          stats={"phase": "train_backbone", "step": step, **recent}))
        if engine is not None:
            with engine.full_parameters("model"):  # ZeRO-3: gather the shards before saving
                if is_main_process():
                    save_model_folder(backend, final, overwrite=args.overwrite)
            engine.barrier()
        else:
            save_model_folder(backend, final, overwrite=args.overwrite)
        if not is_main_process():
            return 0
        recent = [entry["loss"] for entry in losses[-min(50, len(losses)):]]
        notify(registry, "run_end", config=run_config, results={"steps": len(losses), "final_loss": recent[-1]})
        print(f"trained {len(losses)} steps, mean loss of the last {len(recent)}: {sum(recent) / len(recent):.4f}; "
              f"model saved to {final}")
        return 0
