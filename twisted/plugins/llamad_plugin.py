from twisted.application.service import ServiceMaker

llamad = ServiceMaker(
    "llamad",
    "llamad.tap",
    "Run llama.cpp's llama-server behind a streaming gateway and a health site.",
    "llamad",
)
