"""Alexa skill, stage 4: one device (door, light, TV or plug, from the node's event) applies
its actions and reports its new state. The DAG runs one node per device, all this function."""

START = {"door": "closed", "light": "off", "tv": "off", "plug": "off"}
EFFECT = {"open": "open", "close": "closed", "lock": "locked", "on": "on", "off": "off"}


def handler(event, context):
    out = {}
    for device, actions in event["by_device"].items():
        state = START[device]
        for a in actions:
            state = EFFECT.get(a, state)
        out[device] = state
    return {"user": event["user"], "reply": event["reply"], "states": out}
