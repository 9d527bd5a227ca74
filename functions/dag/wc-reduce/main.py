"""Word count, reducer: merges the mappers' counts; reports the total and the top ten."""
from collections import Counter


def handler(event, context):
    total = Counter()
    for counts in event:
        total.update(counts)
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return {"words": sum(total.values()), "distinct": len(total), "top": top}
