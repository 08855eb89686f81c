// Compiles the gllm C++ core (bindings/cpp/src) into this module. The core's BSD/Winsock shim
// (src/socket_stream.cpp) is left out: the module talks over FSocket (GllmSocketStream.cpp).
// Third-party-style code: keep Unreal's macros away from it.
#include "CoreMinimal.h"

THIRD_PARTY_INCLUDES_START
#include "src/value.cpp"
#include "src/zmtp.cpp"
#include "src/protocol.cpp"
#include "src/client.cpp"
#include "src/npc_conversation.cpp"
#include "src/gllm_client_c.cpp"
THIRD_PARTY_INCLUDES_END

namespace gllm {
// The core's default stream factory; the subsystem always passes its own (FSocket), so this is never used.
std::unique_ptr<ByteStream> make_socket_stream() { return nullptr; }
}  // namespace gllm
