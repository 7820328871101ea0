"""A separable toy sentiment task for tiny random models: a sentiment word among filler words."""

import random


def toy_records(n: int = 64) -> list[dict]:
    """n examples alternating neg / pos; the first n of a longer list are the same examples (seeded)."""
    rng = random.Random(0)
    filler = ["the", "movie", "film", "plot", "was", "very", "it", "this"]
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(filler, 3) + [rng.choice(["good", "great", "fun"] if label == "pos" else ["bad", "awful"])]
        rng.shuffle(words)
        out.append({"sample_id": str(i), "text": " ".join(words), "label": label})
    return out
