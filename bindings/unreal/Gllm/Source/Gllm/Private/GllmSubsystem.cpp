#include "GllmSubsystem.h"

#include "GllmSocketStream.h"
#include "Stats/Stats.h"

std::string UGllmSubsystem::ToUtf8(const FString& S)
{
	FTCHARToUTF8 Conv(*S);
	return std::string(Conv.Get(), Conv.Length());
}

FString UGllmSubsystem::FromUtf8(const std::string& S)
{
	FUTF8ToTCHAR Conv(S.data(), (int32)S.size());
	return FString(Conv.Length(), Conv.Get());
}

void UGllmSubsystem::Initialize(FSubsystemCollectionBase& Collection)
{
	Super::Initialize(Collection);
	Client = std::make_unique<gllm::Client>();
	Client->on_connection_changed = [this](bool bUp) { OnConnectionChanged.Broadcast(bUp); };
	gllm::ClientOptions Options;
	Options.client_name = "unreal/0.1";
	Options.token = ToUtf8(Token);
	Options.stream_factory = [] { return MakeGllmSocketStream(); };
	Options.log = [](const std::string& Line) { UE_LOG(LogTemp, Log, TEXT("%s"), *FromUtf8(Line)); };   // I/O thread
	Client->connect(ToUtf8(Host), (uint16_t)Port, Options);
}

void UGllmSubsystem::Deinitialize()
{
	if (Client)
	{
		Client->close();
		Client->poll(std::chrono::milliseconds(5));   // requests in flight end with "disconnected"
		Client.reset();
	}
	Super::Deinitialize();
}

void UGllmSubsystem::Tick(float DeltaTime)
{
	if (!Client) { return; }
	Client->report_frame(DeltaTime * 1000.0, TargetFrameMs);
	Client->poll(std::chrono::microseconds((int64)(PollBudgetMs * 1000.0f)));
}

TStatId UGllmSubsystem::GetStatId() const
{
	RETURN_QUICK_DECLARE_CYCLE_STAT(UGllmSubsystem, STATGROUP_Tickables);
}

void UGllmSubsystem::Warmup(const FString& SystemPrompt)
{
	if (Client) { Client->warmup({gllm::ChatMessage::system(ToUtf8(SystemPrompt)), gllm::ChatMessage::user("Hello.")}); }
}
