"""A DAG node that misbehaves on request: event["fail"] is "raise", "timeout" or "crash"."""
import os
import time


def handler(event, context):
    how = event.get("fail") if isinstance(event, dict) else None
    if how == "raise":
        raise ValueError("dag-fail was asked to fail")
    if how == "timeout":
        time.sleep(3600)
    if how == "crash":
        os._exit(3)
    return event
