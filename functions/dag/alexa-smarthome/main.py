"""Alexa skill, stage 3: the smart-home hub routes each command to its device's function."""


def handler(event, context):
    by_device = {d: [] for d in ("door", "light", "tv", "plug")}
    for c in event["commands"]:
        by_device[c["device"]].append(c["action"])
    return {"user": event["user"], "reply": event["reply"], "by_device": by_device}
