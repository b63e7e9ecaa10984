"""The feature drafter (EAGLE family): one trainable decoder layer that reads the backbone's top
layer and drafts the tokens that follow, at a few hundredths of a full step.

At position p it reads the top-layer state f_p (the residual stream before the final norm) and
the embedded next input e_{p+1}, concatenated and projected to the model's width, through a
trainable copy of the backbone's last layer that attends over the drafter's own earlier
positions (its own small K/V cache). Its output predicts f_{p+1}; the frozen final norm and LM
head, read out over the tokens the backbone writes most on the exit-training split (FR-Spec),
give the draft x_{p+2}. Chained drafts feed the predicted state back in place of f.

Trained on the frozen backbone's own greedy outputs on the exit-training split, never labels:
smooth-L1 to the next top-layer state (both after the frozen final norm) plus cross-entropy to
the backbone's own next token, with "training-time test" (HASS, EAGLE-3): a second pass reads
the drafter's own predictions, so that chained drafts are trained as they are used.
`benchmarks/feature_drafter_replay.py` replayed it before this engine path was built.

`hybrid` drafts from the corpus (`drafters/corpus.py`) where the corpus is surer of the next
token than the feature drafter, and with the feature drafter otherwise. Decoder-only backbones: a T5 decoder layer also attends
over the encoder, which the drafter does not carry.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

# torch and transformers are imported inside the methods: `earlyexit list` imports every built-in
# drafter and stays torch-free (as strategies do)
from earlyexit import hookimpl
from earlyexit.core.drafter import BatchDraftContext, DraftContext, Drafter, DrafterConfig, last_kept
from earlyexit.core.strategy import config_field
from earlyexit.drafters.corpus import CorpusDrafter
from earlyexit.errors import ConfigError, CorruptAdapterError

WEIGHTS_FILE = "feature_drafter.safetensors"
VOCABULARY_KEY = "vocabulary"


@dataclasses.dataclass
class FeatureConfig(DrafterConfig):
    vocabulary: int = config_field(1024, "tokens the drafts are read out over: the backbone's most frequent on the "
                                         "exit-training split")
    outputs: int = config_field(400, "trains on the backbone's own outputs for the first N samples of the "
                                     "exit-training split (about 5 minutes on smol at the defaults)")
    # chosen on smol's dev split (benchmarks/drafter_dev_tuning.py): 60 epochs at 1e-3 drafted 2.55 tokens
    # a round, 30 at 1e-3 2.44, 30 at 3e-4 2.12
    epochs: int = config_field(60, "passes over those outputs")
    learning_rate: float = config_field(1e-3, "AdamW learning rate")
    batch_size: int = config_field(32, "sequences per training step")
    seed: int = config_field(0, "seed of the drafter's initialisation and training order")

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocabulary", "outputs", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive (got {self.learning_rate})")


class FeatureModule:
    """The trainable parts (a projection and a copy of the last layer) and the frozen read-out."""

    def __init__(self, backend, vocabulary):
        import torch

        width = backend.text_config.hidden_size
        self.backend = backend
        self.vocabulary = vocabulary.to(backend.device)
        dtype = backend.language_model.dtype
        self.project = torch.nn.Linear(2 * width, width, device=backend.device, dtype=dtype)
        self.layer = copy.deepcopy(backend.decoder_layers()[-1])
        backend.bind_cache_slot(self.layer, 0)  # its own one-layer cache
        self.index = torch.full((backend.text_config.vocab_size,), -100, dtype=torch.long, device=backend.device)
        self.index[self.vocabulary] = torch.arange(len(self.vocabulary), device=backend.device)

    def parameters(self):
        return list(self.project.parameters()) + list(self.layer.parameters())

    def state_dict(self) -> dict:
        return {**{f"project.{k}": v for k, v in self.project.state_dict().items()},
                **{f"layer.{k}": v for k, v in self.layer.state_dict().items()}}

    def load_state_dict(self, tensors: dict) -> None:
        self.project.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("project.")})
        self.layer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("layer.")})

    def states(self, tops, inputs, mask, positions, cache=None):
        """Predicted next top-layer states from (top state, embedded next input) at each position."""
        import torch

        x = self.project(torch.cat([tops, inputs], -1))
        return self.backend.run_layer(self.layer, x, attention_mask=mask, position_ids=positions, cache=cache)

    def read_out(self, states):
        return self.backend.logits(states, self.vocabulary)


# -- training ---------------------------------------------------------------------------------
def _shifted(tensor):
    """tensor[:, t + 1] at t (the last position repeats: never scored)."""
    import torch

    return torch.cat([tensor[:, 1:], tensor[:, -1:]], 1)


def training_batches(backend, dataset, batch_size: int) -> list:
    """(features, top states, embedded next inputs, tokens two ahead, scored positions) per batch of
    `dataset` (whose targets are the backbone's own outputs), from the frozen backbone."""
    import torch

    from earlyexit.training.features import teacher_forced_features

    out = []
    with torch.no_grad():
        for features in teacher_forced_features(backend, dataset, None, batch_size):
            top = features.hidden[-1]
            inputs = _shifted(features.hidden[0])  # e_{p+1} at p
            targets = features.targets  # targets[:, p] = x_{p+1}
            targets = torch.cat([targets, targets.new_full((targets.shape[0], top.shape[1] - targets.shape[1]), -100)], 1)
            ahead = torch.cat([targets[:, 1:], targets[:, -1:]], 1)  # x_{p+2}: what the state predicted at p reads out
            scored = (targets != -100) & (ahead != -100)
            features.hidden = [None] * len(features.hidden)  # keep the mask and positions only
            out.append((features, top, inputs, ahead, scored))
    return out


def train(module: FeatureModule, data: list, epochs: int, learning_rate: float, seed: int, log) -> float:
    """Fit `module` on `data` (`training_batches`); the seconds it took."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate)
    began = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for b in torch.randperm(len(data), generator=generator).tolist():
            features, top, inputs, ahead, scored = data[b]
            loss = 0.0
            tops = top
            for _ in range(2):  # the second pass reads its own predictions: training-time test
                predicted = module.states(tops, inputs, features.mask, features.positions)
                # compared after the frozen final norm: the residual stream's scale is the norm's to undo
                regression = F.smooth_l1_loss(module.backend.pre_head(predicted[scored]),
                                              module.backend.pre_head(_shifted(top)[scored]))
                ce = F.cross_entropy(module.read_out(predicted[scored]).float(), module.index[ahead[scored]],
                                     ignore_index=-100)
                loss = loss + regression + ce
                tops = torch.cat([top[:, :1], predicted[:, :-1]], 1)  # at p: the prediction of f_p
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"drafter feature: epoch {epoch + 1}/{epochs}, loss {total / max(len(data), 1):.4f}")
    return time.perf_counter() - began


# -- the drafter ------------------------------------------------------------------------------
class FeatureDrafter(Drafter):
    name = "feature"
    description = "one trained layer over the top layer's state (EAGLE family), read out over a truncated vocabulary"
    Config = FeatureConfig
    wants_hidden = True
    drafts_batches = True  # one cache for every row (`propose_batch`)
    wants_samples = True
    decoder_only = True  # a T5 decoder layer also reads the encoder, which the drafter does not carry

    def __init__(self, backend, config=None):
        super().__init__(backend, config)
        if backend.is_encoder_decoder:
            raise ConfigError(f"the {self.name} drafter needs a decoder-only backbone (a T5 decoder layer also reads "
                              "the encoder); use --drafter corpus")
        self.module: FeatureModule | None = None
        self.train_seconds = 0.0

    def fit(self, outputs, log=print, samples=None) -> None:
        import torch

        from earlyexit.core.speculative import draft_vocabulary_of
        from earlyexit.training.exits import with_own_targets

        if samples is None:
            raise ConfigError(f"the {self.name} drafter learns from the backbone's states: fit it with the samples "
                              "its outputs belong to")
        tokenizer = self.backend.processor.tokenizer
        samples = samples.subset(min(len(samples), self.config.outputs))
        texts = {s.id: [tokenizer.decode(tokens, skip_special_tokens=True).strip()]
                 for s, tokens in zip(samples, outputs)}
        if not any(text for pair in texts.values() for text in pair):
            raise ConfigError(f"the {self.name} drafter has nothing to learn from: the backbone wrote only empty "
                              "outputs on the exit-training split")
        torch.manual_seed(self.config.seed)
        vocabulary = draft_vocabulary_of(self.backend, [t for pair in texts.values() for t in pair],
                                         self.config.vocabulary)
        data = training_batches(self.backend, with_own_targets(samples, texts), self.config.batch_size)
        self.module = FeatureModule(self.backend, vocabulary)
        frozen = [p for p in self.backend.model.parameters() if p.requires_grad]
        for parameter in frozen:  # only the drafter's own parameters learn
            parameter.requires_grad_(False)
        try:
            self.train_seconds = train(self.module, data, self.config.epochs, self.config.learning_rate,
                                       self.config.seed, log)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        log(f"drafter feature: trained on {len(texts)} outputs in {self.train_seconds:.0f} s, read out over "
            f"{len(vocabulary)} tokens")

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        tensors[VOCABULARY_KEY] = self.module.vocabulary.cpu()
        save_file(tensors, os.path.join(folder, WEIGHTS_FILE))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        from earlyexit.core.model_folder import safetensors_problem

        path = os.path.join(folder, WEIGHTS_FILE)
        problem = safetensors_problem(path) if os.path.isfile(path) else "missing"
        if problem is not None:
            raise CorruptAdapterError(f"{path}: not this backbone's feature drafter ({problem}); delete the folder "
                                      "to train it again")
        try:
            tensors = load_file(path, device=str(self.backend.device))
            self.module = FeatureModule(self.backend, tensors.pop(VOCABULARY_KEY))
            self.module.load_state_dict(tensors)
        except (OSError, RuntimeError, KeyError, ValueError, IndexError) as error:
            raise CorruptAdapterError(f"{path}: not this backbone's feature drafter ({str(error).splitlines()[0]}); "
                                      "delete the folder to train it again") from None
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    # -- drafting: every row of a batch at once (a single sequence is a batch of one) ---------
    def start(self) -> None:
        self.start_batch(1)

    def start_batch(self, rows: int) -> None:
        from transformers import DynamicCache

        self.cache, self.verified, self.mask = DynamicCache(), 0, None  # mask: its cache's real positions

    def _run(self, tops, inputs, positions, real=None):
        """The drafter's layer on new positions (rows, positions, width; or one row without the
        rows axis), appended to its cache; their outputs. `real` (rows, positions): which of them
        later positions may attend to (all, if not given)."""
        import torch

        alone = tops.dim() == 2
        if alone:
            tops, inputs, positions = tops[None], inputs[None], positions[None]
        if real is None:
            real = torch.ones(positions.shape, dtype=torch.long, device=tops.device)
        self.mask = real if self.mask is None else torch.cat([self.mask, real], 1)
        x = self.module.project(torch.cat([tops, inputs], -1))
        mask = self.backend.layer_mask(x, self.mask, self.cache, 0)
        out = self.backend.run_layer(self.module.layer, x, attention_mask=mask, position_ids=positions,
                                     cache=self.cache)
        return out[0] if alone else out

    def _forget_drafts(self) -> None:
        """Drop last round's drafted positions from its cache: the verified ones replace them."""
        spoken = self.cache.get_seq_length() - self.verified
        if spoken:
            self.cache.crop(-spoken)
            self.mask = self.mask[:, :-spoken]

    def observe_batch(self, context: BatchDraftContext):
        """Take in what the backbone verified since the last round, every row at once: each row's
        predicted state after its newest token (rows, width), and that token's position (rows,)."""
        self._forget_drafts()
        states = self._run(context.hidden, context.inputs, context.positions, context.real)
        self.verified += context.hidden.shape[1]
        last = last_kept(context.real)
        state = states.gather(1, last[:, None, None].expand(-1, 1, states.shape[2]))[:, 0]
        return state, context.positions.gather(1, last[:, None])[:, 0] + 1

    def observe(self, context: DraftContext):
        """`observe_batch` for one sequence: its predicted state (1, width) and the newest token's position."""
        state, position = self.observe_batch(_one_row(context))
        return state, int(position[0])

    def draft_batch(self, state, position, counts: list[int], first_logits=None) -> list[list[int]]:
        """Chained drafts from each row's predicted `state` (rows, width) of the token at `position`
        (rows,): up to `counts[r]` for row r, stopped where its probability falls below τ or after
        an end token. Rows draft in step; one host read at the end (and one a step to stop once
        every row fell below τ). `first_logits`: the first read-out, when the caller has it."""
        import torch

        from earlyexit.core.generation import end_tokens

        steps = max(counts, default=0)
        if steps <= 0:
            return [[] for _ in counts]
        tau = self.config.stop_below
        drafted, sure = [], []
        alive = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
        for i in range(steps):
            logits = first_logits if i == 0 and first_logits is not None else self.module.read_out(state)
            if tau > 0:
                best = logits.float().softmax(-1).max(-1)
                alive = alive & (best.values >= tau)
                index = best.indices
            else:
                index = logits.argmax(-1)
            token = self.module.vocabulary[index]
            drafted.append(token)
            sure.append(alive)
            if i == steps - 1 or (tau > 0 and not bool(alive.any())):
                break
            # the drafted token enters at its own position; the drafter's column sits one before it
            embedded = self.backend.embed(token[:, None], None, position[:, None] + 1)
            state = self._run(state[:, None], embedded.to(state.dtype), position[:, None])[:, 0]
            position = position + 1
        tokens, sure = torch.stack(drafted, 1).tolist(), torch.stack(sure, 1).tolist()
        ends = end_tokens(self.backend.language_model.generation_config)
        out = []
        for row_tokens, row_sure, count in zip(tokens, sure, counts):
            drafts = []
            for token, ok in zip(row_tokens[:max(count, 0)], row_sure):
                if not ok:
                    break
                drafts.append(token)
                if token in ends:
                    break
            out.append(drafts)
        return out

    def draft(self, state, position: int, count: int, first_logits=None) -> list[int]:
        """`draft_batch` for one sequence."""
        import torch

        at = torch.tensor([position], device=state.device)
        first = None if first_logits is None else first_logits.reshape(1, -1)
        return self.draft_batch(state[-1:], at, [count], first)[0]

    def propose_batch(self, context: BatchDraftContext, counts: list[int]) -> list[list[int]]:
        state, position = self.observe_batch(context)
        return self.draft_batch(state, position, counts)

    def propose(self, context: DraftContext, count: int) -> list[int]:
        state, position = self.observe(context)
        return self.draft(state, position, count) if count > 0 else []


def _one_row(context: DraftContext) -> BatchDraftContext:
    """A sequence's context as a batch of one, every position kept."""
    import torch

    real = torch.ones(1, context.hidden.shape[0], dtype=torch.long, device=context.hidden.device)
    return BatchDraftContext([context.tokens], context.hidden[None], context.inputs[None], context.positions[None],
                             real)


@dataclasses.dataclass
class HybridConfig(FeatureConfig):
    draft_length: int = config_field(6, "tokens drafted a round at most (k; the corpus's chains run long)")
    max_match: int = config_field(8, "longest suffix of the tokens so far matched against the corpus")

    def __post_init__(self):
        super().__post_init__()
        if self.max_match < 1:
            raise ConfigError(f"max_match must be at least 1 (got {self.max_match})")


class HybridDrafter(Drafter):
    """The corpus drafts where it is at least as sure of its first token as the feature drafter is
    of its own (the corpus's share of that continuation against the drafter's probability), the
    feature drafter otherwise. The feature drafter takes in every verified state either way, so
    its cache stays whole. The rule was chosen on dev (`benchmarks/drafter_dev_tuning.py`): corpus
    first on any match never lets the feature drafter draft, and a minimum match length gained less."""

    name = "hybrid"
    description = "the corpus where it is surer than the feature drafter, the feature drafter otherwise"
    Config = HybridConfig
    wants_hidden = True
    drafts_batches = True
    wants_samples = True
    decoder_only = True

    def __init__(self, backend, config=None):
        super().__init__(backend, config)
        shared = {"draft_length": self.config.draft_length, "stop_below": self.config.stop_below}
        self.corpus = CorpusDrafter(backend, CorpusDrafter.Config(**shared, max_match=self.config.max_match))
        self.feature = FeatureDrafter(backend, FeatureConfig(**{f.name: getattr(self.config, f.name)
                                                               for f in dataclasses.fields(FeatureConfig)}))
        self.from_corpus = self.from_feature = 0  # rounds each drafted

    def fit(self, outputs, log=print, samples=None) -> None:
        self.corpus.fit(outputs, log)
        self.feature.fit(outputs, log, samples)

    def with_drafting(self, **knobs):
        super().with_drafting(**knobs)
        for part in (self.corpus, self.feature):
            part.with_drafting(**knobs)
        return self

    def save(self, folder: str) -> None:
        for part in (self.corpus, self.feature):
            os.makedirs(os.path.join(folder, part.name))
            part.save(os.path.join(folder, part.name))

    def load(self, folder: str) -> None:
        for part in (self.corpus, self.feature):
            part.load(os.path.join(folder, part.name))

    def start(self) -> None:
        self.feature.start()

    def start_batch(self, rows: int) -> None:
        self.feature.start_batch(rows)

    def propose_batch(self, context: BatchDraftContext, counts: list[int]) -> list[list[int]]:
        state, position = self.feature.observe_batch(context)
        if max(counts, default=0) <= 0:
            return [[] for _ in counts]
        logits = self.feature.module.read_out(state)  # read once: the rule's and the first draft's
        sure = logits.float().softmax(-1).max(-1).values.tolist()
        from_corpus = {}
        for r, (tokens, count) in enumerate(zip(context.tokens, counts)):
            if count > 0:
                drafts, shares = self.corpus.index.continuation(tokens, count, self.config.stop_below,
                                                                self.config.max_match)
                if drafts and shares[0] >= sure[r]:
                    from_corpus[r] = drafts
        # the feature drafter drafts for the other rows, all in step
        feature_counts = [0 if r in from_corpus else count for r, count in enumerate(counts)]
        self.from_corpus += len(from_corpus)
        self.from_feature += sum(count > 0 for count in feature_counts)
        drafted = (self.feature.draft_batch(state, position, feature_counts, logits) if any(feature_counts)
                   else [[] for _ in counts])
        return [from_corpus.get(r, row) for r, row in enumerate(drafted)]

    def propose(self, context: DraftContext, count: int) -> list[int]:
        return self.propose_batch(_one_row(context), [count])[0]


@hookimpl
def earlyexit_register_drafters():
    return [FeatureDrafter, HybridDrafter]
