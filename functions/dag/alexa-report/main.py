"""Alexa skill, last stage: merges the devices' reports into the spoken answer."""


def handler(event, context):
    states = {}
    for report in event:
        states.update(report["states"])
    first = event[0]
    summary = ", ".join("%s %s" % (d, s) for d, s in sorted(states.items()))
    return {"user": first["user"], "speech": "%s: %s" % (first["reply"], summary), "states": states}
