"""Word count, mapper: counts the words of its part of the text."""
from collections import Counter


def handler(event, context):
    return dict(Counter(event.split()))
