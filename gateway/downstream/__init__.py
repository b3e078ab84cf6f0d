"""The client side of the data plane: the connection protocol that reads requests and writes
answers (`connection.py`), what every connection of a listener shares (`serving.py`), and the
accept-queue helpers a drain uses (`listening.py`).

It sits above `gateway.pipeline`: a connection makes the `RequestContext` and runs the route's
handler, knowing the pipeline's interface and never a particular stage.  `gateway.http` below
holds the wire format both sides share (messages, framing, headers, host and path).
"""
