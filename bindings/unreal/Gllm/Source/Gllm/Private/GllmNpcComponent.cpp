#include "GllmNpcComponent.h"

#include "Engine/GameInstance.h"
#include "Engine/World.h"
#include "GllmSubsystem.h"

UGllmNpcComponent::UGllmNpcComponent()
{
	PrimaryComponentTick.bCanEverTick = false;   // the subsystem's tick drives the callbacks
}

void UGllmNpcComponent::Bind()
{
	if (Conversation) { return; }
	Conversation = std::make_unique<gllm::NpcConversation>(UGllmSubsystem::ToUtf8(GetOwner() ? GetOwner()->GetName() : FString()),
		UGllmSubsystem::ToUtf8(SystemPrompt));
	Conversation->on_reply_updated = [this](const std::string& Full)
	{
		FString F = UGllmSubsystem::FromUtf8(Full);
		FString Delta = F.Mid(LastDelta.Len());
		LastDelta = F;
		OnText.Broadcast(Delta, F);
	};
	Conversation->on_reply_completed = [this](const gllm::DoneInfo& Done)
	{
		LastDelta.Reset();
		bLastReplyHadDeadline = Done.ttft_deadline_met.has_value();
		bLastReplyMetDeadline = Done.ttft_deadline_met.value_or(false);
		LastReplyTtftMs = Done.ttft_ms ? (float)*Done.ttft_ms : -1.0f;
		OnCompleted.Broadcast(UGllmSubsystem::FromUtf8(Done.text), UGllmSubsystem::FromUtf8(Done.finish_reason));
	};
	Conversation->on_reply_failed = [this](const std::string& Code, const std::string& Message)
	{
		LastDelta.Reset();
		OnFailed.Broadcast(UGllmSubsystem::FromUtf8(Code), UGllmSubsystem::FromUtf8(Message));
	};
}

void UGllmNpcComponent::BeginPlay()
{
	Super::BeginPlay();
	Bind();
}

void UGllmNpcComponent::EndPlay(const EEndPlayReason::Type Reason)
{
	if (Conversation) { Conversation->cancel(); Conversation->detach(); }
	Conversation.reset();
	Super::EndPlay(Reason);
}

FString UGllmNpcComponent::Say(const FString& Line)
{
	Bind();
	UGameInstance* GI = GetWorld() ? GetWorld()->GetGameInstance() : nullptr;
	UGllmSubsystem* Gllm = GI ? GI->GetSubsystem<UGllmSubsystem>() : nullptr;
	if (!Gllm || !Gllm->GetClient())
	{
		OnFailed.Broadcast(TEXT("disconnected"), TEXT("no UGllmSubsystem in this game instance"));
		return FString();
	}
	Conversation->system_prompt = UGllmSubsystem::ToUtf8(SystemPrompt);
	Conversation->settings.max_tokens = MaxTokens;
	Conversation->settings.temperature = Temperature;
	Conversation->settings.max_tokens_per_s = MaxTokensPerS > 0.0f ? std::optional<double>(MaxTokensPerS) : std::nullopt;
	Conversation->settings.ttft_deadline_ms = TtftDeadlineMs > 0.0f ? std::optional<double>(TtftDeadlineMs) : std::nullopt;
	LastDelta.Reset();
	return UGllmSubsystem::FromUtf8(Conversation->say(*Gllm->GetClient(), UGllmSubsystem::ToUtf8(Line), (int64_t)Priority));
}

void UGllmNpcComponent::Cancel()
{
	if (Conversation) { Conversation->cancel(); }
	LastDelta.Reset();
}

FString UGllmNpcComponent::SaveToJson() const
{
	return Conversation ? UGllmSubsystem::FromUtf8(Conversation->to_json()) : FString();
}

bool UGllmNpcComponent::LoadFromJson(const FString& Json)
{
	Bind();
	gllm::NpcConversation Loaded;
	if (!gllm::NpcConversation::from_json(UGllmSubsystem::ToUtf8(Json), Loaded)) { return false; }
	Conversation->history = Loaded.history;
	Conversation->system_prompt = Loaded.system_prompt;
	Conversation->max_seq_len = Loaded.max_seq_len;
	SystemPrompt = UGllmSubsystem::FromUtf8(Loaded.system_prompt);
	return true;
}
