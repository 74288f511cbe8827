"""Process plumbing shared by the worker (processors/) and the sink (sinks/).

Not the contract: nothing here is on the wire. It lives under schemas/
because schemas is the one package every part may import (data flows one
way: schemas <- producers, processors, sinks <- sluice; processors and sinks
never import each other), so a helper both need has one home here instead
of a copy in each.
"""
