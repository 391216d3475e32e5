"""Training-free text embeddings from a genuine pretrained LLM (SmolLM2-135M-Instruct, GGUF): with
E5-V's one-word-summary prompt in the chat template, a sentence lies closer to its paraphrase than to
the other sentences' paraphrases (the embeddings issue's check)."""

from __future__ import annotations

import pytest
import torch

from mmlm.config import parse_config
from mmlm.model import build
from tests.helpers import tiny_raw

# (sentence, paraphrase): hand-written for this test, one pair per topic, no two pairs about the same thing
PAIRS = [
    ("The train to the airport leaves every twenty minutes.", "Airport trains depart three times an hour."),
    ("My grandmother bakes bread every Sunday morning.", "Each Sunday my gran makes loaves of bread."),
    ("The stock market fell sharply after the announcement.", "Share prices dropped steeply following the news."),
    ("Please turn off the lights when you leave the room.", "Switch the lamps off as you go out."),
    ("The cat is sleeping on the warm windowsill.", "A kitten naps on the sunny window ledge."),
    ("Heavy rain flooded the streets of the village.", "The village roads were under water after a downpour."),
    ("She won the chess tournament without losing a game.", "She took the chess title undefeated."),
    ("The doctor told him to drink more water.", "His physician advised him to stay better hydrated."),
    ("Our flight was cancelled because of the snowstorm.", "The blizzard grounded the plane we were booked on."),
    ("The new phone has a much larger battery.", "This latest handset's battery lasts far longer."),
    ("He forgot his umbrella at the restaurant.", "He left his brolly behind at the diner."),
    ("The museum is closed on Mondays.", "You cannot visit the gallery at the start of the week."),
    ("Tomatoes grow best in full sunlight.", "Tomato plants need plenty of direct sun."),
    ("The children built a sandcastle on the beach.", "The kids made a castle out of sand by the sea."),
    ("The company hired fifty new engineers this year.", "The firm took on fifty more engineers this year."),
    ("I can't find my car keys anywhere.", "My keys to the car have gone missing."),
    ("The concert was so loud that my ears were ringing.", "After the very noisy gig my ears kept buzzing."),
    ("Whales migrate thousands of kilometres each year.", "Every year whales travel huge distances across oceans."),
    ("The recipe calls for two cups of flour.", "You need a couple of cups of flour for this dish."),
    ("The printer in the office has run out of paper.", "There is no paper left in the office printer."),
    ("The goalkeeper saved a penalty in the last minute.", "In the final minute the keeper stopped a spot kick."),
    ("The bridge will be repaired next summer.", "Work to fix the bridge is planned for next summer."),
    ("She is learning to play the violin.", "She has started taking violin lessons."),
    ("The soup is too salty to eat.", "There is far too much salt in this soup."),
    ("The library lends books for three weeks.", "You may borrow library books for twenty-one days."),
    ("The volcano erupted and covered the town in ash.", "Ash from the eruption blanketed the nearby town."),
    ("He runs five kilometres before breakfast.", "Every morning he jogs 5 km before eating."),
    ("The baby started crying in the middle of the night.", "At midnight the infant woke up in tears."),
    ("Electric cars are becoming cheaper to buy.", "The price of battery vehicles keeps falling."),
    ("The teacher asked the students to hand in their essays.", "The pupils were told to submit their papers."),
    ("The hotel room had a view of the mountains.", "From our hotel window we could see the peaks."),
    ("Bees are important for pollinating crops.", "Farm plants rely on bees to carry their pollen."),
]

E5V_TEXT = "{text}\nSummary above sentence in one word:"
# Measured on CPU (torch 2.14, transformers 5.24, 32 pairs): E5-V prompt hit@1 0.906 (29/32), pairwise
# 0.993; plain "{text}" hit@1 0.812, pairwise 0.977. Chance is 1/32 for hit@1 and 0.5 pairwise. The
# thresholds leave room for six more misses (numerics of another torch or GGUF dequantisation) while
# staying over 20x chance: a broken prompt, pooling position or chat template falls far below them.
THRESHOLD_HIT1 = 0.7
THRESHOLD_PAIRWISE = 0.9


@pytest.fixture(scope="module")
def smol_embedder(smollm2_path, smollm2):
    """A pipeline around the session's SmolLM2; the tiny image encoder is never used for text."""
    raw = tiny_raw()
    raw["model"]["llm"] = {"type": "gguf", "path": str(smollm2_path)}
    raw["model"]["embedding"] = {"query": {"text": E5V_TEXT}, "chat_template": True}
    raw["processor"]["max_length"] = 128
    torch.manual_seed(0)
    return build(parse_config(raw), llm=smollm2)


def rates(sentences: torch.Tensor, paraphrases: torch.Tensor) -> tuple[float, float]:
    """hit@1: the share of sentences whose nearest paraphrase (among all of them) is their own.
    pairwise: the share of (sentence, other sentence) pairs where cos(s, p) > cos(s, other), i.e. the
    chance that a sentence beats one other sentence drawn at random, averaged over every draw."""
    n = len(sentences)
    sims = sentences @ paraphrases.T
    hit1 = (sims.argmax(dim=1) == torch.arange(n)).float().mean().item()
    to_others = sentences @ sentences.T
    beats = sims.diagonal().unsqueeze(1) > to_others
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    pairwise = beats[off_diagonal].float().mean().item()
    return hit1, pairwise


def test_e5v_prompted_embeddings_retrieve_paraphrases(smol_embedder):
    model = smol_embedder
    sentences = [s for s, _ in PAIRS]
    paraphrases = [p for _, p in PAIRS]
    assert len(PAIRS) >= 30 and len(set(sentences + paraphrases)) == 2 * len(PAIRS)

    # the prompt the vectors come from: E5-V's summary in SmolLM2's own chat template, pooled at the
    # end of the generation prompt
    enc = model.processor.encode_prompt(E5V_TEXT.replace("{text}", sentences[0]), None, chat_template=True)
    rendered = model.tokenizer.decode(enc.input_ids)
    assert "Summary above sentence in one word:" in rendered and rendered.endswith("<|im_start|>assistant\n")

    s, p = model.embed(sentences), model.embed(paraphrases)
    hit1, pairwise = rates(s, p)

    # the same model without the prompt: each text alone in the chat template
    e5v = model.config.model.embedding
    model.config.model.embedding = e5v.model_copy(update={"query": e5v.query.model_copy(update={"text": "{text}"})})
    try:
        plain_hit1, plain_pairwise = rates(model.embed(sentences), model.embed(paraphrases))
    finally:
        model.config.model.embedding = e5v

    n = len(PAIRS)
    print(
        f"\nSmolLM2-135M-Instruct paraphrase retrieval over {n} pairs (chance hit@1 = {1 / n:.3f}):"
        f"\n  E5-V prompt : hit@1 {hit1:.3f}  pairwise {pairwise:.3f}"
        f"\n  plain {{text}}: hit@1 {plain_hit1:.3f}  pairwise {plain_pairwise:.3f}"
    )
    assert hit1 >= THRESHOLD_HIT1
    assert pairwise >= THRESHOLD_PAIRWISE
