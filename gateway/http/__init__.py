"""HTTP/1.1 as both sides of the proxy speak it: message heads and bodies, framing and flow
control, hop-by-hop headers, Host and request-target normalization, problem+json answers.
The client-side connection protocol is `gateway.downstream`; the upstream one `gateway.upstream`."""
