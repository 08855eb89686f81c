// gllm::ByteStream over Unreal's FSocket (the Sockets module), so the core needs no platform socket code here.
#pragma once

#include "CoreMinimal.h"

THIRD_PARTY_INCLUDES_START
#include "gllm/stream.h"
THIRD_PARTY_INCLUDES_END

#include <memory>

std::unique_ptr<gllm::ByteStream> MakeGllmSocketStream();
