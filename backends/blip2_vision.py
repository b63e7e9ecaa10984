"""BLIP-2's image side, shared by the families built on it (BLIP-2 OPT, MiniGPT-4; InstructBLIP
reuses the early-stopping vision tower, see `instructblip_vision`): the vision
tower, the Q-Former's learned queries reading the image, and the linear projection into the
language model's width. Any model with `vision_model`, `query_tokens`, `qformer` and
`language_projection` (named as in transformers' BLIP-2) works here.
"""

from __future__ import annotations

from earlyexit.errors import ConfigError


def saturating_query_features(model, pixel_values, saturation: float) -> tuple:
    """(projected query outputs, vision layers run per image): each image's vision tower stops
    after the first layer whose output has a mean cosine similarity of at least `saturation`
    with its input (MuE's encoder exit); the last layer's output is taken otherwise."""
    image_embeds, depth = saturating_image_embeds(model, pixel_values, saturation)
    return project_queries(model, image_embeds), depth


def saturating_image_embeds(model, pixel_values, saturation: float) -> tuple:
    """(post-layernormed image embeddings, vision layers run per image) of a vision tower that
    stops early per image (see `saturating_query_features`); any Q-Former may read them."""
    import torch
    import torch.nn.functional as F

    vision = model.vision_model
    layers = vision.encoder.layers
    hidden = vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype))
    result = hidden.clone()
    depth = torch.full((hidden.shape[0],), len(layers), dtype=torch.long, device=hidden.device)
    going = torch.arange(hidden.shape[0], device=hidden.device)
    for i, layer in enumerate(layers):
        new = layer(hidden)
        if i + 1 == len(layers):
            result[going] = new
            break
        similarity = F.cosine_similarity(new.float(), hidden.float(), dim=-1).mean(-1)
        done = similarity >= saturation  # this image's features have settled: stop its tower here
        if bool(done.any()):
            result[going[done]] = new[done]
            depth[going[done]] = i + 1
            going, new = going[~done], new[~done]
            if not len(going):
                break
        hidden = new
    return vision.post_layernorm(result), depth


def project_queries(model, image_embeds):
    """The Q-Former's queries read the (post-layernormed) image embeddings; their outputs are
    projected to the language model's width."""
    import torch

    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=mask, return_dict=True)[0]
    return model.language_projection(query_output.to(image_embeds.dtype))


def tiny_image_side_configs(vision_hidden: int, vision_layers: int, qformer_layers: int, image_size: int,
                            patch_size: int | None, init_std: float) -> tuple:
    """(vision, Q-Former) configs of a small randomly initialised BLIP-2 image side for tests."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                               num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                               patch_size=patch_size or image_size // 2,
                               initializer_range=init_std)  # BLIP-2's 1e-10 assumes pretrained weights
    qformer = Blip2QFormerConfig(hidden_size=vision_hidden, num_hidden_layers=qformer_layers,
                                 num_attention_heads=4, intermediate_size=4 * vision_hidden,
                                 encoder_hidden_size=vision_hidden, initializer_range=init_std)
    return vision, qformer


def scatter_image_features(model, input_ids, features):
    """The language model's input embeddings of `input_ids` with `features` (images, queries,
    width) in the image placeholders: BLIP-2's layout, one placeholder per query, in front of
    the prompt."""
    embeds = model.get_input_embeddings()(input_ids)
    image_slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    if int(image_slots.sum()) != features.shape[0] * features.shape[1]:
        raise ConfigError(f"the prompt must start with {model.config.num_query_tokens} image tokens per image; "
                          "build inputs with backend.prepare_inputs (the processor adds them; the prompt must "
                          "not contain the placeholder text '<image>')")
    return embeds.masked_scatter(image_slots, features.to(embeds.dtype))


def tiny_blip2(text_config, processor, seed: int, num_query_tokens: int, image_size: int, patch_size, vision_hidden: int,
               vision_layers: int, qformer_layers: int, encoder_init_std: float):
    """A randomly initialised `Blip2ForConditionalGeneration` around `text_config` (tests,
    benchmarks), its image placeholder the processor's."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vision, qformer = tiny_image_side_configs(vision_hidden, vision_layers, qformer_layers, image_size, patch_size,
                                              encoder_init_std)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
                         image_token_index=processor.tokenizer.convert_tokens_to_ids(processor.image_token.content))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers leaves the queries at zero (checkpoints bring them): identical
        model.query_tokens.normal_(0.0, encoder_init_std)  # queries would stay identical, as BLIP-2 initialises them
    return model
