"""Word count, mapper-reducer: generates a text of event["words"] words (deterministic from
event["seed"]) and splits it into event["parts"] parts, one per mapper."""
import random

VOCAB = ("serverless function fork template snapshot memory page ring channel payload "
         "sandbox python node shim unit edge graph mapper reducer word count cold warm").split()


def handler(event, context):
    rng = random.Random(int(event.get("seed", 1)))
    words = int(event.get("words", 10000))
    parts = max(1, int(event.get("parts", 4)))
    text = [rng.choice(VOCAB) for _ in range(words)]
    step = (words + parts - 1) // parts
    return [" ".join(text[i:i + step]) for i in range(0, words, step)]
