"""The OpenAI Realtime API over a WebSocket (`/v1/realtime`), on the assistant's own
engine, speech-to-text, turn rules and text-to-speech: `protocol` holds the event shapes,
`listening` decides when the client's user is done, `session` runs one connection and
`app` adds the route and the browser page to the HTTP server."""
