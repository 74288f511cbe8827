"""`sluice gateway`: HTTP in front of the Kafka request-reply.

OpenAI's embeddings API, text-embeddings-inference's /embed and a classify
route, each call turned into requests on the requests topic and answered
from the gateway's own reply topic. Tenant from the API key; backpressure
as 429/503 with Retry-After. `app.make_app` builds the ASGI app."""
