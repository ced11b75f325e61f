"""Running the model over time: the LM decoder (token by token, many sequences at once), the streaming chunker
(tokens -> flow + HiFT chunks), the scheduler thread that interleaves the LLM steps and chunks of concurrent
requests, and the whole-utterance reference path (``reference``). The networks themselves live in ``model/``."""
